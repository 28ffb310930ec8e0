"""The stdlib corpus: the Python standard library source of the running interpreter.

It is the training text of the embedded model (`models/stdlib-tiny`), its held-out evaluation set, and
the default calibration data for compression. Every machine with Python has it, nobody here wrote it,
and its file order is deterministic, so splits and hashes are reproducible for a given Python version.

Splits are by module, never by position inside a file:
- ``heldout``: a fixed list of modules, only ever used to report perplexity;
- ``val``: another fixed list, used to pick the best training checkpoint;
- ``train``: everything else.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

# Folders skipped everywhere: test suites (large, repetitive, and not "library" code), third-party
# packages, caches, and IDLE's tests.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

# Held-out modules: a spread of pure-Python modules of different styles (parsers, numerics, text, data
# structures, a package). Paths are relative to the stdlib root; a folder entry covers everything in it.
HELDOUT_MODULES: tuple[str, ...] = (
    "json/",
    "argparse.py",
    "difflib.py",
    "fractions.py",
    "statistics.py",
    "textwrap.py",
    "heapq.py",
    "shlex.py",
    "csv.py",
    "calendar.py",
    "string.py",
    "queue.py",
    "bisect.py",
    "colorsys.py",
    "graphlib.py",
)

# Validation modules (checkpoint selection during training); disjoint from the held-out list.
VAL_MODULES: tuple[str, ...] = (
    "html/",
    "configparser.py",
    "fnmatch.py",
    "glob.py",
    "pprint.py",
    "random.py",
    "tokenize.py",
    "zipfile.py",
    "wave.py",
    "uuid.py",
)


class Split(str, Enum):
    """Which part of the stdlib corpus."""

    TRAIN = "train"
    VAL = "val"
    HELDOUT = "heldout"


@dataclass(frozen=True)
class CorpusFile:
    """One source file: its path relative to the stdlib root and its text."""

    relpath: str
    text: str


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _matches(relpath: str, entries: tuple[str, ...]) -> bool:
    return any(relpath.startswith(e) if e.endswith("/") else relpath == e for e in entries)


def split_of(relpath: str) -> Split:
    """The split a stdlib-relative path belongs to."""
    if _matches(relpath, HELDOUT_MODULES):
        return Split.HELDOUT
    if _matches(relpath, VAL_MODULES):
        return Split.VAL
    return Split.TRAIN


def list_files(root: Path | None = None) -> list[str]:
    """All corpus source paths (relative, POSIX style), sorted: the deterministic file order."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib folder not found: {root}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def load_split(split: Split | str, root: Path | None = None) -> list[CorpusFile]:
    """The files of one split, in the deterministic order, decoded as UTF-8 (undecodable bytes replaced)."""
    split = Split(split)
    root = root or stdlib_root()
    files = []
    for rel in list_files(root):
        if split_of(rel) is split:
            text = (root / rel).read_bytes().decode("utf-8", errors="replace")
            files.append(CorpusFile(rel, text))
    return files


def corpus_sha256(files: list[CorpusFile]) -> str:
    """A hash over paths and contents, recorded in model cards to identify the exact corpus."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relpath.encode())
        h.update(b"\0")
        h.update(f.text.encode())
        h.update(b"\0")
    return h.hexdigest()
