"""Benchmark of the diffusion family against a raw MONAI loop, in the same run.

1. Training images/s of the ``ddpm`` family (label-conditioned, concat conditioning, CFG dropout; its fit
   through the one training loop: batches, LR schedule, NaN guard, progress, history) next to a raw MONAI loop of
   the same ``DiffusionModelUNet`` (``DiffusionInferer`` + ``DDPMScheduler`` + Adam, random batches, nothing
   else) at the same size, batch and steps; prints the ratio (target ≥ 0.9). EMA is off in both; the family's
   cost of EMA is printed separately.
2. Sampling time of DDIM-50 (corrected scheduler) vs ancestral DDPM over all ``timesteps`` steps, same net.
3. Peak memory: CUDA ``max_memory_allocated`` per phase on a GPU; on the CPU the process's peak RSS.

    .venv/bin/python benchmarks/bench_diffusion.py [--size 32] [--steps 60] [--batch 16] [--device auto]

Each measurement is repeated ``--repeats`` times alternating family and reference; the best of each is kept
(the machine is shared, so the best run is the least disturbed one).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def family_fit(slices, cfg: dict, device: torch.device) -> float:
    from medsynth.models.registry import create_model

    m = create_model("ddpm", cfg)
    sync(device)
    report = m.fit(slices, seed=0)
    return float(report["train_images_per_s"]), m


def raw_monai(slices, cfg: dict, device: torch.device) -> float:
    """The same U-Net trained by a plain MONAI loop: inferer forward, MSE to ε, Adam step."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    from medsynth.labels import N_CLASSES
    from medsynth.models.latent.common import labels_to_size, one_hot, to_size
    from medsynth.models.registry import create_model
    from medsynth.utils.seeding import seed_everything

    seed_everything(0)  # the same global settings as a family fit (deterministic algorithms on), for a fair ratio
    unet = create_model("ddpm", cfg).build_modules()["unet"].to(device)
    sched = DDPMScheduler(num_train_timesteps=cfg["timesteps"], schedule="linear_beta")
    inferer = DiffusionInferer(sched)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg["lr"])
    s = cfg["image_size"]
    x_all = torch.from_numpy(to_size(slices.images, s)).to(device) * 2 - 1
    c_all = one_hot(torch.from_numpy(labels_to_size(slices.labels, s).astype("int64")), N_CLASSES).to(device)
    b = cfg["batch_size"]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        idx = torch.randint(0, len(x_all), (b,), device=device)
        x, c = x_all[idx], c_all[idx]
        noise = torch.randn_like(x)
        t = torch.randint(0, cfg["timesteps"], (b,), device=device)
        pred = inferer(x, unet, noise, t, condition=c, mode="concat")
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return cfg["steps"] * b / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-sample", type=int, default=4)
    ap.add_argument("--timesteps", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from medsynth.models.latent.toy import toy_slices
    from medsynth.models.torch_family import resolve_device

    device = resolve_device(args.device)
    slices = toy_slices(16, 4, args.size, seed=0)
    cfg = {
        "image_size": args.size, "channels": tuple(args.channels), "steps": args.steps, "batch_size": args.batch,
        "timesteps": args.timesteps, "lr": 2e-4, "ema_decay": None, "progress": False, "device": args.device,
        "cond_drop_prob": 0.1, "anomaly_t0": args.timesteps // 4,
    }  # fmt: skip
    print(f"device {device}; U-Net channels {tuple(args.channels)} at {args.size}²; batch {args.batch}; "
          f"{args.steps} steps; {torch.get_num_threads()} torch thread(s)")  # fmt: skip

    fam, raw, mem_fam, mem_raw = 0.0, 0.0, 0.0, 0.0
    model = None
    for _ in range(args.repeats):
        reset_peak(device)
        r = raw_monai(slices, cfg, device)
        mem_raw = max(mem_raw, peak_mb(device))
        reset_peak(device)
        f, model = family_fit(slices, cfg, device)
        mem_fam = max(mem_fam, peak_mb(device))
        fam, raw = max(fam, f), max(raw, r)
    print(f"training  family ddpm {fam:8.1f} img/s | raw MONAI loop {raw:8.1f} img/s | ratio {fam / raw:.2f} "
          f"(target >= 0.9)")  # fmt: skip
    ema, _ = family_fit(slices, {**cfg, "ema_decay": 0.999}, device)
    print(f"training  family ddpm with EMA {ema:8.1f} img/s (ratio to no EMA {ema / fam:.2f})")
    mem_label = "peak CUDA MiB" if device.type == "cuda" else "process peak RSS MiB (cumulative)"
    print(f"memory    {mem_label}: raw loop {mem_raw:.0f}, family fit {mem_fam:.0f}")

    labels = slices.labels[: args.n_sample]
    times = {}
    for sampler in ("ddim", "ddpm"):
        model.config.sampler = sampler
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        model.sample(args.n_sample, labels, seed=0)
        sync(device)
        times[sampler] = time.perf_counter() - t0
        steps = model.config.sample_steps if sampler == "ddim" else args.timesteps
        mem = f"{mem_label.split(' (')[0]} {peak_mb(device):.0f}"
        print(f"sampling  {sampler.upper()}-{steps}: {times[sampler]:.2f} s for {args.n_sample} images ({mem})")
    print(f"sampling  DDPM / DDIM time ratio {times['ddpm'] / times['ddim']:.1f}x")


if __name__ == "__main__":
    main()
