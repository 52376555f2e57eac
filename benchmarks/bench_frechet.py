"""Benchmark: medsynth's eigendecomposition Fréchet distance vs the scipy ``sqrtm`` formula, same run.

Features: two sets of N × D (default 10,000 × 2048, InceptionV3 pool size) ReLU random projections of
correlated Gaussians (non-negative, low effective rank, like real CNN activations). Both methods get the
same Gaussian statistics; the covariance time is reported separately. Prints the time of each method, the
ratio scipy / medsynth and their relative disagreement.

    .venv/bin/python benchmarks/bench_frechet.py [--n 10000] [--dim 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# BLAS thread count must be fixed before numpy initialises
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "2"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)

import numpy as np  # noqa: E402


def features(n: int, dim: int, seed: int, shift: float) -> np.ndarray:
    g = np.random.default_rng(seed)
    latent = g.standard_normal((n, 256))
    proj = np.random.default_rng(1234).standard_normal((256, dim)) / 16.0
    return np.maximum(latent @ proj + shift, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="BLAS/torch threads (set before numpy loads)")
    args = ap.parse_args()

    from medsynth.evaluation.fidelity import frechet_from_stats, frechet_from_stats_scipy, gaussian_stats

    a = features(args.n, args.dim, 0, 0.0)
    b = features(args.n, args.dim, 1, 0.05) * 1.05
    t0 = time.perf_counter()
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    t_stats = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = frechet_from_stats(*sa, *sb)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = frechet_from_stats_scipy(*sa, *sb)
    t_ref = time.perf_counter() - t0

    print(f"features: 2 x {args.n} x {args.dim}; covariance stats {t_stats:.2f} s")
    print(f"medsynth FD (eigh)     : {ours:.10g}  in {t_ours:.2f} s")
    print(f"scipy sqrtm formula    : {ref:.10g}  in {t_ref:.2f} s")
    print(f"time ratio scipy/ours  : {t_ref / t_ours:.1f}x")
    print(f"relative disagreement  : {abs(ours - ref) / abs(ref):.2e}")


if __name__ == "__main__":
    main()
