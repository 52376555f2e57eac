"""Benchmark of the latent-variable and flow families on this CPU, at their documented default sizes.

For each family: training throughput (images/s: closed-form fit for PCA/PPCA/shape, ``--steps`` optimiser steps
of the default batch for the neural families), sampling throughput (slices/s) and the peak resident memory of a
process that only fits and samples that family. Each family runs in its own subprocess so peaks do not mix.
PCA is the reference measured in the same run; ratios are family / PCA.

Input: synthetic LGE-like slices (``medsynth.models.latent.toy``) at ``--size`` (default 128, the project's
preprocessing size); every family resizes to its own working size (PCA/PPCA 128, shape 96, AE/VAE/flow 64).

    .venv/bin/python benchmarks/bench_latent.py [--threads 2] [--steps 20] [--n 256] [--families pca,vae,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

FAMILIES = ("pca", "ppca", "shape_pca", "ae", "dae", "vae", "cvae", "flow")


def run_one(family: str, n: int, size: int, steps: int, threads: int, n_sample: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from medsynth.models.latent.toy import toy_slices
    from medsynth.models.registry import create_model

    data = toy_slices(n // 2, 2, size=size, seed=0)
    neural = family not in ("pca", "ppca", "shape_pca")
    cfg = {"steps": steps, "progress": False} if neural else {}
    model = create_model(family, cfg)
    t0 = time.perf_counter()
    report = model.fit(data, seed=0)
    fit_s = time.perf_counter() - t0
    images = steps * min(model.config.batch_size, len(data)) if neural else len(data)
    labels = data.labels[:n_sample] if model.conditional else None
    model.sample(2, labels=None if labels is None else labels[:2], seed=0)  # warm-up
    t0 = time.perf_counter()
    s = model.sample(n_sample, labels=labels, seed=1)
    sample_s = time.perf_counter() - t0
    assert np.all(np.isfinite(s.images))
    return {
        "family": family,
        "work_size": getattr(model.config, "image_size", None),
        "train_images_per_s": images / fit_s,
        "sample_slices_per_s": n_sample / sample_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss_first": report.get("loss_first"),
        "loss_last": report.get("loss_last"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--n", type=int, default=256, help="training slices")
    ap.add_argument("--size", type=int, default=128, help="native slice size")
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps timed for neural families")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-sample", dest="n_sample", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.size, args.steps, args.threads, args.n_sample)))
        return 0
    fams = [f for f in args.families.split(",") if f]
    if "pca" not in fams:
        fams.insert(0, "pca")  # the reference
    rows = []
    for fam in fams:
        cmd = [sys.executable, __file__, "--one", fam, "--n", str(args.n), "--size", str(args.size)]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--n-sample", str(args.n_sample)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    ref = next(r for r in rows if r["family"] == "pca")
    print(f"threads={args.threads} n={args.n} native={args.size}px steps={args.steps} (reference: pca, same run)")
    head = f"{'family':<10}{'work':>6}{'train img/s':>13}{'x pca':>9}{'sample sl/s':>13}{'x pca':>9}{'peak MB':>9}"
    print(head)
    for r in rows:
        print(
            f"{r['family']:<10}{r['work_size'] or '':>6}{r['train_images_per_s']:>13.1f}"
            f"{r['train_images_per_s'] / ref['train_images_per_s']:>9.3f}{r['sample_slices_per_s']:>13.1f}"
            f"{r['sample_slices_per_s'] / ref['sample_slices_per_s']:>9.3f}{r['peak_rss_mb']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
