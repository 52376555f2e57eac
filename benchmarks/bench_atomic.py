"""Stress benchmark: concurrent ``atomic_dir`` writers on one target.

P processes each replace the same target N times through :func:`medsynth.utils.atomic.atomic_dir`. Prints
the failed replacements (the old rename-aside scheme failed with ``Directory not empty`` /
``FileNotFoundError``), the ``.tmp-*`` / ``.old-*`` folders left behind, whether the final target is one
complete write, and the replacements per second next to a reference: the same number of plain
``os.rename`` of fresh folders into distinct targets in the same run (the ratio is the cost of safety).

    .venv/bin/python benchmarks/bench_atomic.py [--procs 3] [--n 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def writer(target: str, n: int, tag: int, queue) -> None:
    from medsynth.utils.atomic import atomic_dir

    failures: dict[str, int] = {}
    for i in range(n):
        try:
            with atomic_dir(target) as tmp:
                (tmp / "a.txt").write_text(f"{tag}-{i}\n")
                (tmp / "b.txt").write_text(f"{tag}-{i}\n")
        except Exception as err:  # counted: the point of the benchmark
            key = f"{type(err).__name__}: {err.strerror if isinstance(err, OSError) else err}"
            failures[key] = failures.get(key, 0) + 1
    queue.put(failures)


def stress(root: Path, procs: int, n: int) -> tuple[dict[str, int], list[str], bool, float]:
    """Run ``procs`` writers × ``n`` replacements on ``root/target``; return failures, leftovers, ok, seconds."""
    target = root / "target"
    queue: mp.Queue = mp.Queue()
    ps = [mp.Process(target=writer, args=(str(target), n, k, queue)) for k in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    failures: dict[str, int] = {}
    for _ in ps:
        for k, v in queue.get().items():
            failures[k] = failures.get(k, 0) + v
    for p in ps:
        p.join()
    seconds = time.perf_counter() - t0
    leftovers = sorted(p.name for p in root.iterdir() if p.name != "target")
    a, b = (target / "a.txt").read_text(), (target / "b.txt").read_text()
    return failures, leftovers, a == b, seconds


def reference(root: Path, total: int) -> float:
    t0 = time.perf_counter()
    for i in range(total):
        d = Path(tempfile.mkdtemp(dir=root))
        (d / "a.txt").write_text("x")
        (d / "b.txt").write_text("x")
        os.rename(d, root / f"t{i}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        failures, leftovers, ok, secs = stress(Path(d), args.procs, args.n)
    with tempfile.TemporaryDirectory() as d:
        ref = reference(Path(d), args.procs * args.n)
    total = args.procs * args.n
    print(f"{args.procs} processes x {args.n} replacements: {sum(failures.values())} failed {failures}")
    print(f"leftover temp folders: {len(leftovers)} {leftovers[:5]}")
    print(f"final target is one complete write: {ok}")
    print(f"atomic_dir: {total / secs:.0f} replacements/s; plain renames: {total / ref:.0f}/s; ratio {secs / ref:.2f}")


if __name__ == "__main__":
    main()
