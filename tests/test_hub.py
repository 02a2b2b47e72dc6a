"""Repo ids resolve through the Hugging Face cache; tests never touch the network."""

import os
import shutil
import subprocess
import sys

from conftest import FIXTURES


def fill_cache(hf_home, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567", ref="main"):
    """Lay out a model in the cache the way huggingface_hub does after a download."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def run(args, hf_home):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "minislm", *args], capture_output=True, text=True, env=env, timeout=120)


def test_repo_id_from_a_prefilled_cache_offline(tmp_path):
    fill_cache(tmp_path, "tiny-org/tiny-phi3", FIXTURES / "gqa")
    result = run(["generate", "--model", "tiny-org/tiny-phi3", "hello", "-n", "3", "--no-chat-template"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "generated 3 tokens" in result.stderr


def test_revision_selects_the_cached_ref(tmp_path):
    fill_cache(tmp_path, "tiny-org/tiny-phi3", FIXTURES / "gqa", commit="a" * 40, ref="v1")
    ok = run(["generate", "--model", "tiny-org/tiny-phi3", "--revision", "v1", "hi", "-n", "1"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    missing = run(["generate", "--model", "tiny-org/tiny-phi3", "--revision", "v2", "hi", "-n", "1"], tmp_path)
    assert missing.returncode == 2 and "--revision v2" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr


def test_local_folder_wins_over_repo_id_lookup(tmp_path, monkeypatch):
    from minislm.hub import resolve_model_dir

    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/name").resolve() == (tmp_path / "org" / "name").resolve()
