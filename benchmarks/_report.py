"""Helpers shared by the benchmark scripts: the machine's description and in-place doc sections."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def machine() -> str:
    """CPU model and core count, GPU name when present, and library versions: printed with every result."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def write_section(path: Path, name: str, body: str, title: str) -> None:
    """Replace (or append) the block between `<!-- BEGIN name -->` and `<!-- END name -->` in `path`."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
