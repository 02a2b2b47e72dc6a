"""Build tests/fixtures/phi3-tokenizer/ : the real Phi-3 tokenizer, for the test suite.

    python tools/make_phi3_tokenizer.py                  # downloads the source package (~77 MB)
    python tools/make_phi3_tokenizer.py --sdist FILE     # or uses one you already have

The Phi-3 vocabulary has to come from somewhere a test can reach without the Hub.
llama.cpp's tokenizer tests ship it as `models/ggml-vocab-phi-3.gguf` (metadata
only, no weights), with test strings (`.inp`) and the ids the original tokenizer
gives them (`.out`); the llama-cpp-python 0.3.36 source package on PyPI vendors
both. This script takes them from that package, rebuilds tokenizer.json with
minislm's own GGUF reader (`minislm.formats.gguf_tokenizer`, the same code that
loads `--model file.gguf`), checks the result against all 47 test vectors and the
Phi-3 chat ids, and only then writes the fixture folder:

    tokenizer.json          `tokenizers` format, 32064 ids, the hub's rstrip flags
    tokenizer_config.json   BOS/EOS/UNK/PAD, add_bos_token, the original chat template
    vocab-test.inp/.out     llama.cpp's test vectors, copied unchanged
    ggml-vocab-phi-3.gguf   the vocabulary file itself (0.7 MB), so the suite can
                            check the GGUF reader against it without a download
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gguf import GGUFReader

from minislm.formats.gguf_tokenizer import tokenizer_from_gguf

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "phi3-tokenizer"

PACKAGE = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
# sha256 of that file as PyPI serves it: the fixture is built from exactly these bytes.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-phi-3.gguf"

# `<s><|user|>\nHi<|end|>\n<|assistant|>\n` with the hub's tokenizer.json (and
# transformers 4.4x on Microsoft's samples); ../PHI3_FACTS.md, "Whitespace around the
# chat tokens". llama.cpp gives 1, 32010, 6324, 32007, 32001 (it rstrips every special).
CHAT_TEXT = "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
CHAT_IDS = [1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001]


def download_sdist(folder: Path) -> Path:
    """pip, the ordinary client, fetches the source package (no build, no dependencies)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(folder)],
        check=True,
    )
    return folder / SDIST_NAME


def check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SDIST_SHA256:
        sys.exit(f"{path}: sha256 {digest.hexdigest()} is not the one this fixture was made from ({SDIST_SHA256})")


def extract(sdist: Path, folder: Path) -> dict[str, Path]:
    """The .gguf and its .inp/.out, read by exact member name (no extractall)."""
    files = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for suffix in ("", ".inp", ".out"):
            member = archive.extractfile(MEMBER + suffix)
            if member is None:
                sys.exit(f"{sdist}: {MEMBER + suffix} is not a regular file")
            files[suffix] = folder / Path(MEMBER + suffix).name
            files[suffix].write_bytes(member.read())
    return files


def vocab_test_vectors(inp: str, out: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's format: strings separated by lines `__ggml_vocab_test__`, one line of ids each."""
    strings = inp.split("\n__ggml_vocab_test__\n")
    strings[-1] = strings[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    ids = [[int(i) for i in line.split()] for line in out.split("\n")]
    return list(zip(strings, ids))


def check(tokenizer, inp: str, out: str) -> int:
    vectors = vocab_test_vectors(inp, out)
    failures = [text for text, ids in vectors if tokenizer.encode(text, add_special_tokens=False).ids != ids]
    if len(vectors) != 47 or failures:
        sys.exit(f"{len(failures)} of {len(vectors)} vocab vectors differ, e.g. {failures[:3]!r}")
    chat = tokenizer.encode(CHAT_TEXT, add_special_tokens=False).ids
    if chat != CHAT_IDS:
        sys.exit(f"chat ids {chat}, expected {CHAT_IDS}")
    return len(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"{SDIST_NAME} already downloaded (default: pip download it)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"fixture folder (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = args.sdist or download_sdist(tmp)
        check_sha256(sdist)
        files = extract(sdist, tmp)
        tokenizer, config = tokenizer_from_gguf(GGUFReader(files[""]))
        inp = files[".inp"].read_text(encoding="utf-8")
        out = files[".out"].read_text(encoding="utf-8")
        n = check(tokenizer, inp, out)

        # Build the whole folder in the temporary one first: a failed check writes nothing.
        staging = tmp / "phi3-tokenizer"
        staging.mkdir()
        tokenizer.save(str(staging / "tokenizer.json"), pretty=False)  # 1.4 MB; pretty is 3.6 MB
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        shutil.copyfile(files[".inp"], staging / "vocab-test.inp")
        shutil.copyfile(files[".out"], staging / "vocab-test.out")
        shutil.copyfile(files[""], staging / files[""].name)
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staging, args.out)
    print(f"wrote {args.out}: {n}/47 vocab vectors and the chat ids match")


if __name__ == "__main__":
    main()
