"""What a user expects around the commands (issue 11, section 3): prompts from files
and pipes, a chat REPL that survives Ctrl-C and says what it did, a README example
that runs as written, a command list. (The word before Numba compiles: test_compile_notice.py.)"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from minislm.cli import main
from conftest import FIXTURES, ROOT

GQA = FIXTURES / "gqa"


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):
        yield


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_minislm(*args, stdin: str = "", env=None):
    return subprocess.run(
        [sys.executable, "-m", "minislm", *map(str, args)], capture_output=True, text=True, input=stdin,
        timeout=300, env=dict(os.environ, **(env or {})),
    )


GREEDY = ["--model", GQA, "-n", "6", "--no-chat-template"]


# ---------------------------------------------------------------- where the prompt comes from


def test_prompt_from_a_file_equals_the_same_prompt_as_an_argument(capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text("hello there\n", encoding="utf-8")  # one trailing newline is dropped
    code, from_argument, _ = cli(capsys, "generate", *GREEDY, "hello there")
    assert code == 0
    assert cli(capsys, "generate", *GREEDY, "--file", tmp_path / "prompt.txt")[:2] == (0, from_argument)


@pytest.mark.parametrize("flags", [["-p", "-"], ["-"], []], ids=["-p -", "- as PROMPT", "a pipe and no prompt"])
def test_prompt_from_stdin(flags):
    expected = run_minislm("generate", *GREEDY, "hello there")
    piped = run_minislm("generate", *GREEDY, *flags, stdin="hello there\n")
    assert piped.returncode == expected.returncode == 0, piped.stderr
    assert piped.stdout == expected.stdout


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["hello", "--file", "{tmp}/p.txt"], ["give the prompt once", "PROMPT", "--file"]),
        (["--prompt", "hi", "--file", "{tmp}/p.txt"], ["give the prompt once"]),
        (["--file", "{tmp}/missing.txt"], ["--file", "no such file"]),
        (["--file", "{tmp}"], ["--file", "is a folder"]),
    ],
)
def test_prompt_sources_that_conflict_or_are_missing(capsys, tmp_path, argv, fragments):
    (tmp_path / "p.txt").write_text("hi")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(capsys, "generate", "--model", GQA, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert all(f in err for f in fragments), err


def test_an_empty_pipe_is_no_prompt():
    result = run_minislm("generate", "--model", GQA, stdin="")
    assert result.returncode == 2 and result.stderr.strip() == "minislm: error: no prompt: stdin was empty"


# ---------------------------------------------------------------- the chat REPL


def feed_input(monkeypatch, lines):
    """Answer chat's input() with these lines; an exception class in the list is raised
    there instead (KeyboardInterrupt = Ctrl-C at the prompt); EOF after the last."""
    queue = list(lines)

    def fake_input(prompt=""):
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)


def stats_lines(err):
    return [line for line in err.splitlines() if line.startswith("[prompt")]


def test_clear_says_what_it_forgot(capsys, monkeypatch):
    feed_input(monkeypatch, ["hello", "and again", "/clear", "fresh", "/bye"])
    code, _, err = cli(capsys, "chat", "--model", GQA, "-n", "3", "--system", "Be brief.")
    assert code == 0, err
    cleared = [line for line in err.splitlines() if line.startswith("[cleared")]
    assert len(cleared) == 1
    assert re.fullmatch(r"\[cleared: 2 turns and \d+ cached tokens forgotten; the system message stays\]", cleared[0])
    assert "reused" not in stats_lines(err)[2]  # the cache really was emptied


def test_context_full_is_reported_on_the_turn_that_fills_it(capsys, monkeypatch):
    """--ctx-size 40: the first reply stops at the 40th token and says so right away,
    not only when the next message no longer fits."""
    feed_input(monkeypatch, ["hello", "/bye"])
    code, _, err = cli(capsys, "chat", "--model", GQA, "-n", "100", "--ctx-size", "40", "--temp", "0")
    assert code == 0, err
    lines = err.splitlines()
    assert "stop: context" in stats_lines(err)[0]
    full = lines.index(stats_lines(err)[0]) + 1
    assert lines[full].startswith("[context full: this conversation now fills all 40 tokens")


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(capsys, monkeypatch):
    """In-process: the reply stream is interrupted after two pieces (as SIGINT would
    interrupt it); the session goes on; Ctrl-C at the prompt then leaves with status 0."""
    import minislm.commands as commands

    real_generate_text = commands.generate_text
    calls = []

    def interrupted_once(tokenizer, tokens, stops, stats):
        calls.append(1)
        for n, piece in enumerate(real_generate_text(tokenizer, tokens, stops, stats)):
            if len(calls) == 1 and n == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(commands, "generate_text", interrupted_once)
    feed_input(monkeypatch, ["hello", "and again", KeyboardInterrupt])
    code, out, err = cli(capsys, "chat", "--model", GQA, "-n", "5")
    assert code == 0, err
    assert "[reply stopped; Ctrl-C again or Ctrl-D to leave]" in err
    first, second = stats_lines(err)
    assert "stop: interrupted" in first
    assert int(re.search(r"generated (\d+) tokens", first).group(1)) < 5  # cut short of -n 5
    assert "reused from the cache" in second  # the interrupted turn left a usable cache


@pytest.fixture
def endless_model(tmp_path) -> Path:
    """The gqa fixture with a 4096-token context and no end-of-sequence id, so a reply
    runs for thousands of tokens: long enough to be interrupted."""
    folder = tmp_path / "endless"
    shutil.copytree(GQA, folder)
    for name, changes in [
        ("config.json", {"max_position_embeddings": 4096, "eos_token_id": None}),
        ("generation_config.json", {"eos_token_id": []}),
    ]:
        raw = json.loads((folder / name).read_text())
        raw.update(changes)
        (folder / name).write_text(json.dumps(raw))
    raw = json.loads((folder / "tokenizer_config.json").read_text())
    raw.pop("eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(raw))
    return folder


def read_until(stream, pattern: bytes, timeout: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while pattern not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_sigint_during_a_reply_then_again_at_the_prompt(endless_model):
    """A real process and real signals: the first SIGINT ends the reply (the session
    survives), the second, at the prompt, leaves."""
    chat = subprocess.Popen(
        [sys.executable, "-m", "minislm", "chat", "--model", str(endless_model), "-n", "4000", "--ctx-size", "4096"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    try:
        assert b"Ctrl-C to stop a reply" in read_until(chat.stderr, b"Ctrl-C to stop a reply", 120)
        chat.stdin.write(b"hello\n")
        chat.stdin.flush()
        streamed = read_until(chat.stdout, b">>> ", 60)  # the prompt; then wait for the reply to stream
        deadline = time.monotonic() + 60
        while len(streamed.split(b">>> ", 1)[-1]) < 20 and time.monotonic() < deadline:
            streamed += read_until(chat.stdout, b"\x00", 0.2)
        assert len(streamed.split(b">>> ", 1)[-1]) >= 20, streamed
        chat.send_signal(signal.SIGINT)
        err = read_until(chat.stderr, b"[reply stopped", 60)
        assert b"[reply stopped" in err, err
        assert b"stop: interrupted" in err
        time.sleep(0.3)  # back at input()
        chat.send_signal(signal.SIGINT)
        assert chat.wait(timeout=60) in (0, 130)  # left; 130 if the signal beat input() by a hair
        assert b"Traceback" not in err + chat.stderr.read()
    finally:
        chat.kill()
        chat.wait()


# ---------------------------------------------------------------- the README and the command list


def test_readme_python_api_example_runs_as_written(capsys):
    """The README's example, executed verbatim on the bundled model: the streamed text
    keeps its spaces (token-by-token decode would glue the words together)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    model, ids = namespace["model"], namespace["ids"]
    generated = list(model.generate(ids, max_new_tokens=40))
    logprob_lines = "".join(f"{e.token} {e.logprob} {e.top}\n" for e in model.generate(ids, 5, logprobs=3))
    assert printed == model.tokenizer.decode(generated) + "\n" + logprob_lines
    assert namespace["fast"] == generated and len(logprob_lines.splitlines()) == 5
    assert printed.count(" ") >= 5
    assert len(namespace["sampled"]) >= 1


def test_no_command_prints_the_command_list():
    result = run_minislm()
    assert result.returncode == 0
    for command in ("generate", "chat", "perplexity", "quantize", "verify", "bench"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.M), result.stdout
