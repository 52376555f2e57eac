"""pix2pix and SPADE families against a raw loop of the same MONAI networks, in the same run.

Training: the family's ``fit`` (the one training loop: discriminator step then generator step on one shared
generator forward, Adam, the family's losses) against a raw ``zero_grad / backward / step`` loop over the same
networks (built by :mod:`medsynth.models.gan.networks`), the same losses, batch size and iterations on the same
tensors; the family's time is its training loop's (``train_images_per_s`` of the fit report). Sampling:
``model.sample`` (label checks, one-hot, resize, scale back) against the bare generator forward under
``no_grad`` on the same label maps. Prints iterations/s, slices/s, the ratio family / raw (target ≥ 0.9) and
peak memory (CUDA: ``max_memory_allocated`` per phase; CPU: growth of the process's peak RSS during the
phase, a high-water mark, so 0 when an earlier phase had already peaked higher). The first repeat also warms
up allocators and kernels; best-of ``--repeats`` times are reported.

    .venv/bin/python benchmarks/bench_gan.py [--size 64] [--iters 30] [--batch 8] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-sample", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from medsynth.data.slices import SliceSet
    from medsynth.labels import N_CLASSES
    from medsynth.models.gan.losses import Adversarial, feature_matching, kl_normal, tissue_mean_l1
    from medsynth.models.gan.networks import (
        multiscale_discriminator,
        patch_discriminator,
        spade_generator,
        unet_generator,
    )
    from medsynth.models.latent.common import one_hot
    from medsynth.models.latent.toy import toy_slices
    from medsynth.models.registry import create_model

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    s, bs = args.size, args.batch
    slices: SliceSet = toy_slices(8, 4, s, scar=True, seed=0)
    configs = {
        "pix2pix": {"image_size": s, "channels": (16, 32, 64, 128), "disc_channels": 32, "adversarial": "lsgan"},
        "spade": {"image_size": s, "channels": (16, 32, 64, 64), "spade_hidden": 32, "z_dim": 16,
                  "disc_channels": 32, "num_d": 2, "disc_layers": 2},
    }  # fmt: skip

    def peak_start() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            return 0.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak_mib(start: float) -> float:
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated(dev) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def family_fit(name: str):
        model = create_model(name, {**configs[name], "steps": args.iters, "batch_size": bs, "progress": False,
                                    "device": args.device})  # fmt: skip
        start = peak_start()
        report = model.fit(slices, seed=0)
        # the loop's own time (the report's throughput), not the set-up around it (scale, data on the device)
        return model, args.iters * min(bs, len(slices)) / report["train_images_per_s"], peak_mib(start)

    def raw_fit(name: str, model):
        # the same networks, losses and tensors as the family; nothing but forward / backward / step
        cfg = model.config
        torch.manual_seed(0)
        x_all, lab_all = model.paired(slices)
        if name == "pix2pix":
            gen = unet_generator(N_CLASSES + cfg.noise_channels, cfg.channels, cfg.num_res_units, 0.0).to(dev)
            disc = patch_discriminator(N_CLASSES + 1, cfg.disc_channels, cfg.disc_layers).to(dev)
            betas = (0.5, 0.999)
        else:
            style = (cfg.style_every_block, cfg.style_pooling, cfg.style_tissue_head)
            gen = spade_generator(N_CLASSES, s, cfg.channels, cfg.z_dim, cfg.spade_hidden, *style).to(dev)
            disc = multiscale_discriminator(N_CLASSES + 1, cfg.disc_channels, cfg.num_d, cfg.disc_layers, s).to(dev)
            betas = (0.0, 0.999)
        adv = Adversarial(cfg.adversarial)
        opt_d = torch.optim.Adam(disc.parameters(), cfg.disc_lr or cfg.lr, betas=betas)
        opt_g = torch.optim.Adam(gen.parameters(), cfg.lr, betas=betas)
        start = peak_start()
        sync()
        t0 = time.perf_counter()
        for it in range(args.iters):
            idx = torch.from_numpy(np.random.default_rng([0, it]).permutation(len(x_all))[:bs]).to(dev)
            x, cond = x_all[idx], one_hot(lab_all[idx])
            if name == "pix2pix":
                noise = F.interpolate(torch.randn(len(x), cfg.noise_channels, cfg.noise_res, cfg.noise_res, device=dev),
                                      size=(s, s), mode="bilinear", align_corners=False)  # fmt: skip
                fake, kl = gen(torch.cat([cond, noise], 1)), None
            else:
                fake, mu, logvar = gen(cond, x)
                kl = kl_normal(mu, logvar)
            for p in gen.parameters():
                p.requires_grad_(False)
            if name == "pix2pix":
                d = adv.d_loss(disc(torch.cat([cond, x], 1))[-1], disc(torch.cat([cond, fake.detach()], 1))[-1])
            else:
                d = adv.d_loss(disc(torch.cat([cond, x], 1))[0], disc(torch.cat([cond, fake.detach()], 1))[0])
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()
            for p in gen.parameters():
                p.requires_grad_(True)
            for p in disc.parameters():
                p.requires_grad_(False)
            if name == "pix2pix":
                g = adv.g_loss(disc(torch.cat([cond, fake], 1))[-1]) + cfg.lambda_l1 * F.l1_loss(fake, x)
            else:
                out, ff = disc(torch.cat([cond, fake], 1))
                with torch.no_grad():
                    _, rf = disc(torch.cat([cond, x], 1))
                g = (adv.g_loss(out) + cfg.lambda_fm * feature_matching(rf, ff) + cfg.lambda_l1 * F.l1_loss(fake, x)
                     + cfg.lambda_kl * kl + cfg.lambda_tissue * tissue_mean_l1(fake, x, cond))  # fmt: skip
            opt_g.zero_grad(set_to_none=True)
            g.backward()
            opt_g.step()
            for p in disc.parameters():
                p.requires_grad_(True)
        sync()
        return gen, time.perf_counter() - t0, peak_mib(start)

    def family_sample(model) -> float:
        labels = slices.labels[np.arange(args.n_sample) % len(slices)]
        model.sample(8, labels[:8], seed=0)  # warm-up
        sync()
        t0 = time.perf_counter()
        model.sample(len(labels), labels, seed=0)
        sync()
        return time.perf_counter() - t0

    @torch.no_grad()
    def raw_sample(name: str, model) -> float:
        cfg = model.config
        gen = model.module("gen")
        labels = slices.labels[np.arange(args.n_sample) % len(slices)]
        lab = torch.from_numpy(labels.astype(np.int64)).to(dev)
        gen(torch.zeros(1, N_CLASSES + cfg.noise_channels, s, s, device=dev)) if name == "pix2pix" else None
        sync()
        t0 = time.perf_counter()
        cond = one_hot(lab)
        if name == "pix2pix":
            noise = F.interpolate(torch.randn(len(lab), cfg.noise_channels, cfg.noise_res, cfg.noise_res),
                                  size=(s, s), mode="bilinear", align_corners=False).to(dev)  # fmt: skip
            y = gen(torch.cat([cond, noise], 1))
        else:
            y = gen.decode(cond, torch.randn(len(lab), cfg.z_dim).to(dev))
        y.cpu().numpy()
        sync()
        return time.perf_counter() - t0

    print(f"device={dev} threads={args.threads} size={s} batch={bs} iters={args.iters} n_sample={args.n_sample}; "
          f"best of {args.repeats} interleaved runs; reference: raw loop of the same networks, same run")  # fmt: skip
    print(f"{'family':<9}{'raw it/s':>10}{'fit it/s':>10}{'x raw':>7}{'raw slc/s':>11}{'smp slc/s':>11}{'x raw':>7}"
          f"{'raw MiB':>9}{'fit MiB':>9}")  # fmt: skip
    for name in configs:
        t_fit, t_raw, t_smp, t_rsmp, m_fit, m_raw = [], [], [], [], [], []
        for _ in range(args.repeats):
            model, t, m = family_fit(name)
            t_fit.append(t), m_fit.append(m)
            _, t, m = raw_fit(name, model)
            t_raw.append(t), m_raw.append(m)
            t_smp.append(family_sample(model)), t_rsmp.append(raw_sample(name, model))
        fit_ips, raw_ips = args.iters / min(t_fit), args.iters / min(t_raw)
        smp, rsmp = args.n_sample / min(t_smp), args.n_sample / min(t_rsmp)
        print(f"{name:<9}{raw_ips:>10.2f}{fit_ips:>10.2f}{fit_ips / raw_ips:>7.3f}{rsmp:>11.1f}{smp:>11.1f}"
              f"{smp / rsmp:>7.3f}{max(m_raw):>9.1f}{max(m_fit):>9.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
