"""What hostile-but-valid inputs cost the serving loop: stop strings and long prompts.

1. Stop strings: `TextStream._held_back` runs after every token of a request with `stop`. Timed with 16 stops
   of 256 characters (the server's limits), against the check it replaced (every tail length against every
   stop), on code text and on text drawn from the same three letters as the stops (the worst case seen).
2. Long prompts: the server tokenizes in a worker thread. The Rust tokenizer must release the GIL for that to
   keep the event loop responsive: a 10 ms timer on another thread is watched while a ~3.8 MB prompt encodes.

    python benchmarks/bench_input_costs.py
"""

from __future__ import annotations

import random
import threading
import time
import timeit
from pathlib import Path

import torch

from sparsedial.engine.sampling import TextStream

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "stdlib-tiny"


class _CharTokenizer:
    """Enough of a tokenizer for TextStream; _held_back only looks at the text."""

    clean_up_tokenization_spaces = False
    backend_tokenizer = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def held_back_before(text: str, stops: tuple[str, ...], max_stop: int) -> int:
    """The previous check: every tail length against every stop string."""
    for n in range(min(max_stop - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def stop_costs() -> list[tuple[str, float, float]]:
    rng = random.Random(0)
    rows = []
    for label, alphabet, text in (("code text, stops from a,b,c", "abc", "def fibonacci(n):\n    return n" * 30),
                                  ("code text, stops from x,y,z", "xyz", "def fibonacci(n):\n    return n" * 30),
                                  ("text and stops from a,b,c", "abc", "abc" * 400)):
        stops = tuple("".join(rng.choice(alphabet) for _ in range(256)) for _ in range(16))
        ts = TextStream(_CharTokenizer(), [1, 2, 3], stops)
        ts.text = text
        n = 300
        now = timeit.timeit(ts._held_back, number=n) / n * 1e6
        before = timeit.timeit(lambda: held_back_before(text, stops, 256), number=n) / n * 1e6
        assert ts._held_back() == held_back_before(text, stops, 256)  # same answer
        rows.append((label, before, now))
    return rows


def tokenizer_gap() -> tuple[int, int, float, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    text = ("def f(x):\n    return x * 2  # comment\n" * 100000)[: 4 * 2**20]
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.01)
            gaps.append(time.perf_counter() - t)

    th = threading.Thread(target=ticker)
    th.start()
    t0 = time.perf_counter()
    ids = tok.encode(text, add_special_tokens=False)
    took = time.perf_counter() - t0
    stop.set()
    th.join()
    return len(text), len(ids), took, max(gaps)


def main() -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    print(f"machine: {cpu}, torch {torch.__version__}")
    print("stop-string hold-back per token, 16 stops x 256 characters (us): before -> now")
    for label, before, now in stop_costs():
        print(f"  {label:30s} {before:8.1f} -> {now:6.1f}")
    chars, tokens, took, gap = tokenizer_gap()
    print(f"tokenizing {chars} characters ({tokens} tokens) took {took:.2f} s; a 10 ms timer on another thread "
          f"slipped at most {gap * 1000:.0f} ms meanwhile")


if __name__ == "__main__":
    main()
