"""The statistics line `generate` and `chat` print on stderr (commands.print_stats).

Decode speed counts the tokens after the first, which comes from the prefill's logits
(STYLE.md: tokens/s for decode counts generated tokens only), so one generated token
has no decode step to time: the line says so instead of printing 0.00 tok/s.
"""

import re

import minislm
from minislm.cli import main
from minislm.commands import print_stats
from minislm.generate import GenerationStats
from conftest import FIXTURES


MODEL = minislm.load(FIXTURES / "gqa")


def stats_line(capsys, stats: GenerationStats) -> str:
    print_stats(stats, MODEL)
    return capsys.readouterr().err


def test_one_generated_token_has_no_decode_rate(capsys):
    line = stats_line(capsys, GenerationStats(prompt_tokens=6, prefill_seconds=0.1, generated_tokens=1, stop_reason="length"))
    assert "generated 1 token," in line and "1 tokens" not in line
    assert "decode rate n/a" in line and "tok/s" not in line.split("generated")[1]


def test_two_tokens_give_a_rate_over_the_one_decode_step(capsys):
    line = stats_line(capsys, GenerationStats(prompt_tokens=1, prefill_seconds=0.5, generated_tokens=2, decode_seconds=0.25))
    assert "prompt 1 token, 2.0 tok/s" in line
    assert "generated 2 tokens, 4.00 tok/s" in line


def test_nothing_run_prints_no_rates(capsys):
    line = stats_line(capsys, GenerationStats(prompt_tokens=3, generated_tokens=0, stop_reason="length"))
    assert "prompt 3 tokens |" in line and "generated 0 tokens |" in line and "tok/s" not in line


def test_generate_n_1_says_1_token(capsys):
    code = main(["generate", "--model", str(FIXTURES / "gqa"), "-n", "1", "--no-chat-template", "hello"])
    err = capsys.readouterr().err
    assert code == 0
    assert re.search(r"generated 1 token, decode rate n/a \(the one token came from the prefill\)", err), err
