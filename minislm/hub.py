"""Turn `--model` (a local folder or a Hugging Face repo id) into a local folder.

Downloads go through `huggingface_hub.snapshot_download`, so the cache, `HF_HOME`,
`HF_HUB_OFFLINE`, tokens and the progress bar behave as in every other HF tool.
We fetch only what minislm reads: safetensors weights, JSON configs, tokenizer
files and chat templates. Pickle weights are never downloaded.
"""

import os
from pathlib import Path

from .errors import MinislmError

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken"]


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a repo id looked up in (or downloaded to) the HF cache."""
    if not str(model).strip():
        raise MinislmError("--model is empty; give a model folder or a Hugging Face repo id")
    path = Path(model).expanduser()
    try:
        if path.exists():
            if not path.is_dir():
                raise MinislmError(f"--model {model}: is a file; give the folder that holds config.json")
            os.listdir(path)  # needs read permission
            (path / "config.json").exists()  # needs search (x) permission
            return path
    except PermissionError:
        raise MinislmError(f"--model {model}: permission denied (cannot read the folder)") from None
    if not looks_like_repo_id(str(model)):
        raise MinislmError(f"--model {model}: no such folder")
    return download(str(model), revision)


def looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except RevisionNotFoundError:
        raise MinislmError(f"--revision {revision}: not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise MinislmError(f"--model {repo_id}: no such folder, and no such (public) repo on the Hugging Face Hub") from None
    except Exception as e:  # offline, no network, cache miss: huggingface_hub raises many types
        if offline():
            reason = "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = f"could not fetch it from the Hugging Face Hub ({first_line})"
        at = f" at --revision {revision}" if revision else ""
        raise MinislmError(f"--model {repo_id}{at}: no such folder, and {reason}") from None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
