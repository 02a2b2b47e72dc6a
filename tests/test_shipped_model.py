"""The Shakespeare model shipped inside the package: offline, under the quality bar,
robust to int4, and token-for-token what transformers computes from the same files.

These are the only tests that use trained weights, so they are the only ones that
can say something about text quality and about what quantization costs.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import minislm
from minislm.load import BUNDLED_MODEL
from minislm.perplexity import score_text
from conftest import ATOL_FP32_LOGITS, ROOT, import_reference

HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"  # from Macbeth, a held-out play
QUALITY_BAR_NATS_PER_CHAR = 1.60  # the bar (nanoGPT's CPU baby GPT: 1.88)
INT4_MAX_PERPLEXITY_INCREASE = 0.03
SPEAKER_LINE = re.compile(r"^[A-Z][A-Z' ]+[A-Z]\.$", re.MULTILINE)  # "ROMEO." / "FIRST WITCH."


@pytest.fixture(scope="module")
def heldout_text():
    return HELDOUT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def fp32_score(heldout_text):
    return score_text(minislm.load(BUNDLED_MODEL), heldout_text)


def test_generate_with_no_model_flag_uses_the_shipped_model_offline(tmp_path):
    """The README's command, from a folder with no model in it, no network, an empty HF cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run(
        [sys.executable, "-m", "minislm", "generate", "ROMEO:", "--max-tokens", "80"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "hf-home").exists() or not any((tmp_path / "hf-home").rglob("*.safetensors"))
    # It reads like a play: at least two speaker headings and a line of speech.
    assert len(SPEAKER_LINE.findall(result.stdout)) >= 2, result.stdout
    assert any(line and not SPEAKER_LINE.fullmatch(line) for line in result.stdout.splitlines()), result.stdout


def test_heldout_excerpt_is_under_the_quality_bar(fp32_score, heldout_text):
    assert fp32_score.characters == len(heldout_text)
    assert fp32_score.nats_per_char <= QUALITY_BAR_NATS_PER_CHAR, fp32_score


def test_bf16_loading_changes_nothing(fp32_score, heldout_text):
    """The shipped weights are bf16, so widening them in-kernel must score exactly the same."""
    bf16 = score_text(minislm.load(BUNDLED_MODEL, quant="bf16"), heldout_text)
    assert bf16.tokens == fp32_score.tokens
    assert bf16.nats_per_char == pytest.approx(fp32_score.nats_per_char, rel=1e-5)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_raises_perplexity_by_at_most_3_percent(fp32_score, heldout_text, group_size):
    int4 = score_text(minislm.load(BUNDLED_MODEL, quant="int4", group_size=group_size), heldout_text)
    increase = int4.token_perplexity / fp32_score.token_perplexity - 1
    assert 0 <= increase <= INT4_MAX_PERPLEXITY_INCREASE, f"int4 g{group_size}: {100 * increase:+.2f}% token perplexity"


# ---------------------------------------------------------------- live: against transformers


@pytest.fixture(scope="module")
def reference_model():
    torch, transformers = import_reference()
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(reference_model, heldout_text):
    torch, _ = import_reference()
    ours = minislm.load(BUNDLED_MODEL)
    ids = ours.tokenizer.encode(heldout_text[:3000])[:ours.config.max_position_embeddings]
    with torch.no_grad():
        theirs = reference_model(torch.tensor([ids])).logits[0].numpy()
    mine = ours.logits(ids)
    assert np.abs(mine - theirs).max() <= ATOL_FP32_LOGITS
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("repetition_penalty", [None, 1.0])
@pytest.mark.parametrize("prompt", ["ROMEO:", "<|user|>\nSpeak, Juliet.<|end|>\n<|assistant|>\n"])
def test_greedy_tokens_match_transformers(reference_model, prompt, repetition_penalty):
    """None: both sides follow generation_config.json (repetition penalty 1.2); 1.0: plain argmax."""
    torch, _ = import_reference()
    ours = minislm.load(BUNDLED_MODEL)
    ids = ours.tokenizer.encode(prompt, add_bos=True)
    mine = list(ours.generate(ids, 60, repetition_penalty=repetition_penalty))
    kwargs = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
    with torch.no_grad():
        out = reference_model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False, **kwargs)
    theirs = out[0, len(ids):].tolist()
    assert len(mine) > 10
    assert mine == theirs
