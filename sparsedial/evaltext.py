"""Real evaluation text, offline: English prose and Python code for models trained elsewhere.

- **prose**: CPython's documentation as Debian ships it (package `python3-doc`, HTML under
  /usr/share/doc/python3-doc/html), turned into plain text with the stdlib `html.parser`: only the page's
  main body (Sphinx's `<div role="main">`), without code blocks (`<pre>`), scripts, styles or the "¶"
  header links; one paragraph per block element, whitespace collapsed.
- **code**: the Python source of pip as installed in the running environment (`pip/_internal`, not the
  vendored libraries): every venv has it, and nothing in sparsedial trains on it.

Each kind has two fixed, disjoint splits chosen by folder, never by position in a file: `calibration`
(the only text compression may read) and `heldout` (only ever used to report perplexity). Files are read in
sorted path order, so a split's text and its sha256 (over paths and contents, like
sparsedial.corpus.corpus_sha256) are reproducible for a given python3-doc / pip version; record both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

PYTHON_DOC_DIR = Path("/usr/share/doc/python3-doc/html")
APT_PACKAGE = "python3-doc"

# folders of the HTML documentation (relative to its root) per split
PROSE_SPLITS: dict[str, tuple[str, ...]] = {
    "heldout": ("tutorial/", "howto/"),
    "calibration": ("faq/", "reference/", "using/", "extending/"),
}
# folders of pip's package (relative to the `pip` package folder) per split
CODE_SPLITS: dict[str, tuple[str, ...]] = {
    "heldout": ("_internal/operations/", "_internal/req/", "_internal/resolution/"),
    "calibration": ("_internal/cli/", "_internal/commands/", "_internal/index/", "_internal/models/",
                    "_internal/network/", "_internal/utils/", "_internal/vcs/", "_internal/metadata/",
                    "_internal/distributions/", "_internal/locations/"),
}
KINDS = ("prose", "code")
SPLITS = ("calibration", "heldout")


class EvalTextMissing(RuntimeError):
    """The text source is not on this machine (a one-line message says what to install)."""


@dataclass(frozen=True)
class EvalText:
    """One split of one kind: its files (relative paths, sorted), their texts and the split's sha256."""

    kind: str
    split: str
    root: str
    files: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return split_sha256(self.files, self.texts)

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)

    def manifest(self) -> dict:
        return {"kind": self.kind, "split": self.split, "root": self.root, "files": list(self.files),
                "chars": self.chars, "bytes": sum(len(t.encode()) for t in self.texts), "sha256": self.sha256}


def split_sha256(files, texts) -> str:
    """sha256 over each file's relative path and text (NUL-separated), in order."""
    h = hashlib.sha256()
    for rel, text in zip(files, texts, strict=True):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ HTML to text
_BLOCK = frozenset({"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
                    "dl", "dt", "dd", "tr", "table", "blockquote", "br", "hr", "figure", "caption", "td",
                    "th"})
_SKIP = frozenset({"script", "style", "pre", "head", "title", "noscript", "textarea"})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
                   "track", "wbr"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip: list[str] = []  # open elements whose content is dropped
        self._div_depth = 0
        self._main_depth: int | None = None  # div depth at which the main body opened
        self.saw_main = False
        self._all: list[str] = []  # paragraphs of the whole page (used when it has no main body)

    def _flush(self) -> None:
        text = " ".join("".join(self._buf).split())
        self._buf = []
        if text:
            (self.paragraphs if self._main_depth is not None else self._all).append(text)

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "div":
            self._div_depth += 1
            if self._main_depth is None and a.get("role") == "main":
                self._flush()
                self._main_depth, self.saw_main = self._div_depth, True
        if self._skip:
            if tag not in _VOID:
                self._skip.append(tag)
            return
        if tag in _SKIP or (tag == "a" and "headerlink" in (a.get("class") or "").split()):
            self._skip.append(tag)
            return
        if tag in _BLOCK:
            self._flush()

    def handle_startendtag(self, tag, attrs) -> None:
        if not self._skip and tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag) -> None:
        if self._skip:
            if tag in self._skip:  # close up to the matching open element (tolerates unclosed children)
                while self._skip and self._skip.pop() != tag:
                    pass
            if tag != "div":
                return
        elif tag in _BLOCK:
            self._flush()
        if tag == "div":
            if self._main_depth is not None and self._div_depth == self._main_depth:
                self._flush()
                self._main_depth = None
            self._div_depth = max(0, self._div_depth - 1)

    def handle_data(self, data) -> None:
        if not self._skip:
            self._buf.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML page: its `<div role="main">` body if it has one (else the whole page), one
    paragraph per block element separated by a blank line, inline whitespace collapsed, without `<pre>`
    blocks, scripts, styles and Sphinx's header links."""
    p = _TextExtractor()
    p.feed(html)
    p.close()
    p._flush()
    paras = p.paragraphs if p.saw_main else p._all
    return "\n\n".join(paras) + "\n" if paras else ""


# ----------------------------------------------------------------------------------------------- sources
def python_doc_root(root: Path | None = None) -> Path:
    """The HTML root of CPython's documentation; EvalTextMissing (one line naming the package) if absent."""
    root = Path(root) if root is not None else PYTHON_DOC_DIR
    if not (root / "tutorial").is_dir():
        raise EvalTextMissing(f"prose evaluation text needs CPython's HTML documentation at {root}: "
                              f"install the Debian package {APT_PACKAGE} (apt-get install -y {APT_PACKAGE})")
    return root.resolve()


def pip_root() -> Path:
    try:
        import pip
    except ImportError:
        raise EvalTextMissing("code evaluation text needs pip's source: python -m ensurepip") from None
    return Path(pip.__file__).resolve().parent


def _select(root: Path, pattern: str, folders: tuple[str, ...]) -> list[str]:
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob(pattern) if p.is_file())
    return [r for r in rels if any(r.startswith(f) for f in folders)]


def load(kind: str, split: str, root: Path | None = None) -> EvalText:
    """One split ('calibration' or 'heldout') of one kind ('prose' or 'code')."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"kind must be one of {KINDS} and split one of {SPLITS}, got {kind!r}, {split!r}")
    if kind == "prose":
        base = python_doc_root(root)
        files = _select(base, "*.html", PROSE_SPLITS[split])
        texts = [html_to_text((base / f).read_bytes().decode("utf-8", errors="replace")) for f in files]
    else:
        base = Path(root).resolve() if root is not None else pip_root()
        files = _select(base, "*.py", CODE_SPLITS[split])
        texts = [(base / f).read_bytes().decode("utf-8", errors="replace") for f in files]
    keep = [(f, t) for f, t in zip(files, texts) if t.strip()]
    if not keep:
        raise EvalTextMissing(f"no {kind} files for the {split} split under {base}")
    return EvalText(kind, split, str(base), tuple(f for f, _ in keep), tuple(t for _, t in keep))


def versions() -> dict:
    """What the texts come from: the documentation folder it resolves to and pip's version."""
    out = {}
    try:
        out["python_doc"] = str(python_doc_root())
    except EvalTextMissing as e:
        out["python_doc"] = f"missing ({e})"
    try:
        import pip

        out["pip"] = pip.__version__
    except ImportError:
        out["pip"] = "missing"
    return out
