"""Synthesis throughput and peak memory: the GMM family vs TorchIO on the same label maps, same run.

GMM: ``GMMModel.sample`` (per-image population draw, label-to-image rendering with spatially correlated
tissue fields, bias field, partial-volume blur, noise), vectorised over the batch; ``gmm-white`` is the same
model with ``texture: white`` (same per-tissue histograms, no spatial texture correlation); ``gmm`` renders
whole images with the default surroundings partition, ``gmm-field`` the background as one random field
(``surroundings: field``, the closer match to TorchIO, which renders the label classes only).
TorchIO: ``Compose([RandomLabelsToImage, RandomBiasField, RandomBlur, RandomNoise])`` one subject at a time
(its normal use). Both run in their own subprocess — one process, 2 threads each — on the same 128×128
phantom LGE label maps, so peak RSS is measured per method. Prints slices/s, peak memory and the ratio.

Run: ``.venv/bin/python benchmarks/bench_gmm_synthesis.py [--n 512] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = "2"


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Current RSS (MB), with the peak counter reset to it where Linux allows (``clear_refs`` 5): the
    worker's own peak must not include the import or the parent's footprint (``ru_maxrss`` survives exec)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or _peak_rss_mb()


def _peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(method: str, work: Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(THREADS))
    labels = np.load(work / "labels.npy")
    n = len(labels)
    if method in ("gmm", "gmm-white", "gmm-field"):
        from medsynth.models.base import GenerativeModel

        model = GenerativeModel.load(work / ("model_field" if method == "gmm-field" else "model"))
        model.threads = int(THREADS)
        if method == "gmm-white":
            model.config.texture = "white"
            model._renderer = None
        model.sample(8, labels[:8], seed=0)  # warm-up (quantile tables, FFT plans)
        base = _reset_peak()

        def run(seed: int) -> None:
            model.sample(n, labels, seed=seed)

    else:
        import torchio as tio

        transform = tio.Compose(
            [
                tio.RandomLabelsToImage(label_key="label", image_key="image"),
                tio.RandomBiasField(),
                tio.RandomBlur(),
                tio.RandomNoise(),
            ]
        )
        tensors = [torch.from_numpy(lab[None, ..., None].astype(np.int64)) for lab in labels]

        def run(seed: int) -> None:
            torch.manual_seed(seed)
            for t in tensors:
                _ = transform(tio.Subject(label=tio.LabelMap(tensor=t)))["image"].data

        for t in tensors[:8]:
            transform(tio.Subject(label=tio.LabelMap(tensor=t)))
        base = _reset_peak()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        run(r + 1)
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_mb()
    best = min(times)
    return {
        "method": method,
        "n": n,
        "seconds": best,
        "slices_per_s": n / best,
        "peak_rss_mb": peak,
        "peak_increase_mb": peak - base,
    }


def prepare(work: Path, n: int) -> None:
    import torch

    torch.set_num_threads(int(THREADS))
    from medsynth.data.preprocess import PreprocessConfig, load_slices
    from medsynth.models.gmm.model import GMMModel
    from medsynth.phantom.generate import generate_dataset

    manifest = generate_dataset(work / "phantom", subjects=6, contrast="lge", seed=0, shape=(128, 128, 8))
    slices = load_slices(manifest, cfg=PreprocessConfig(size=128))
    for name, params in (("model", {}), ("model_field", {"surroundings": "field"})):
        model = GMMModel(params)
        model.fit(slices, seed=0)
        model.save(work / name)
    idx = np.arange(n) % len(slices)
    np.save(work / "labels.npy", slices.labels[idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="label maps per timed run (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--worker", choices=["gmm", "gmm-white", "gmm-field", "torchio"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.work), args.repeats)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, OPENBLAS_NUM_THREADS=THREADS)
    with tempfile.TemporaryDirectory(prefix="bench-gmm-") as tmp:
        work = Path(tmp)
        prepare(work, args.n)
        results = {}
        for method in ("gmm", "gmm-white", "gmm-field", "torchio"):
            cmd = [sys.executable, __file__, "--worker", method, "--work", str(work), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    for r in results.values():
        print(
            f"{r['method']:8s} {r['slices_per_s']:9.1f} slices/s  ({r['n']} slices 128x128 in {r['seconds']:.2f} s)  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB (+{r['peak_increase_mb']:.0f} MB during synthesis)"
        )
    for method in ("gmm", "gmm-white", "gmm-field"):
        ratio = results[method]["slices_per_s"] / results["torchio"]["slices_per_s"]
        print(f"throughput ratio {method} / torchio: {ratio:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
