"""Training speed of the translation families: CycleGAN, CUT and FastCUT, in one run.

CUT's claim (Park et al. 2020) is a lower training cost than CycleGAN: one generator and one discriminator, no
cycle, instead of two of each. Each family is fitted through its own ``fit`` (the one training loop, the same
batch size and working size, the family's own defaults for everything else: CUT with identity PatchNCE,
FastCUT without identity but with flip equivariance, 256 patches per layer) on the same random two-domain
slice set; a few warm-up steps are fitted first and not counted. Each timing is the best of ``--repeats``
interleaved fits, as process CPU time (with one torch thread this is the compute cost, and it stays meaningful
on a machine shared with other jobs) and as wall time; ratios are iterations/s relative to CycleGAN measured
in the same run. ``--lambda-seg``
adds the segmentation-consistency loss to all three (its U-Net's training is then part of the time).

    .venv/bin/python benchmarks/bench_translation.py [--steps 20] [--size 64] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64, help="working image size")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lambda-seg", type=float, default=0.0)
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from medsynth.data.slices import META_COLUMNS, SliceSet
    from medsynth.models.registry import create_model

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = 32
    meta = pd.DataFrame({c: [""] * (2 * n) for c in META_COLUMNS})
    meta["subject_id"] = [f"s{i % n}" for i in range(2 * n)]
    meta["vendor"] = ["a"] * n + ["b"] * n
    labels = rng.integers(0, 4, (2 * n, args.size, args.size)).astype(np.uint8)
    slices = SliceSet(rng.random((2 * n, 1, args.size, args.size)).astype(np.float32), labels, meta)
    common = {
        "domain_key": "vendor", "source": "a", "target": "b", "image_size": args.size,
        "batch_size": args.batch_size, "progress": False, "device": "cpu", "lambda_seg": args.lambda_seg,
        "seg_iterations": 20,
    }  # fmt: skip
    families = ("cyclegan", "cut", "fastcut")

    def fit_seconds(family: str, steps: int) -> tuple[float, float]:
        model = create_model(family, {**common, "steps": steps})
        c0, t0 = time.process_time(), time.perf_counter()
        model.fit(slices, seed=0)
        return time.process_time() - c0, time.perf_counter() - t0

    for family in families:  # warm-up: first-call costs (imports, allocator) are not the family's
        fit_seconds(family, 2)
    times: dict[str, list[tuple[float, float]]] = {f: [] for f in families}
    for _ in range(args.repeats):  # interleaved, so drifting load hits all families alike
        for family in families:
            times[family].append(fit_seconds(family, args.steps))
    print(
        f"threads={args.threads} size={args.size} batch={args.batch_size} steps={args.steps} "
        f"lambda_seg={args.lambda_seg} best of {args.repeats} (reference: cyclegan, same run)"
    )
    print(f"{'family':<10}{'CPU ms/it':>11}{'CPU it/s':>10}{'x cyclegan':>12}{'wall ms/it':>12}{'x cyclegan':>12}")
    cpu_ref = args.steps / min(t[0] for t in times["cyclegan"])
    wall_ref = args.steps / min(t[1] for t in times["cyclegan"])
    for family in families:
        cpu, wall = min(t[0] for t in times[family]), min(t[1] for t in times[family])
        print(
            f"{family:<10}{cpu / args.steps * 1e3:>11.1f}{args.steps / cpu:>10.2f}{args.steps / cpu / cpu_ref:>12.2f}"
            f"{wall / args.steps * 1e3:>12.1f}{args.steps / wall / wall_ref:>12.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
