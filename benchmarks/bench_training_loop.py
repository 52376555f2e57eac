"""Overhead of the one training loop (:func:`medsynth.models.training.train_loop`) against a raw torch loop.

Both loops run the same model, optimiser, batches (:func:`~medsynth.models.training.batch_indices`) and number
of iterations; the raw loop is ``zero_grad / backward / step`` and nothing else. The loop is timed plain (one
step, no checkpoint, no bar) and with everything a family may switch on (EMA, cosine schedule with warm-up,
gradient clipping, a checkpoint every 50 iterations). Two models: a tiny MLP, where per-iteration bookkeeping
dominates, and the AE family's default network (MONAI VarAutoEncoder, 64×64, batch 32). Each timing is the best
of ``--repeats`` interleaved runs; ratios are loop / raw, measured in the same run.

    .venv/bin/python benchmarks/bench_training_loop.py [--iters 200] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from monai.networks.nets import VarAutoEncoder
    from torch import nn

    from medsynth.models.training import EMA, TrainStep, batch_indices, make_scheduler, train_loop

    torch.set_num_threads(args.threads)

    def mlp() -> tuple[nn.Module, torch.Tensor, callable]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        return net, torch.randn(512, 17), lambda b: (net(b[:, :16])[:, 0] - b[:, 16]).pow(2).mean()

    def ae() -> tuple[nn.Module, torch.Tensor, callable]:
        torch.manual_seed(0)
        net = VarAutoEncoder(2, (1, 64, 64), 1, 32, (16, 32, 64), (2, 2, 2), use_sigmoid=False)

        def loss_of(b: torch.Tensor) -> torch.Tensor:
            return (net.decode_forward(net.encode_forward(b)[0], use_sigmoid=False) - b).pow(2).mean()

        return net, torch.rand(256, 1, 64, 64), loss_of

    def raw(build, bs: int) -> float:
        net, data, loss_of = build()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        net.train()
        t0 = time.perf_counter()
        for it in range(args.iters):
            batch = data[torch.from_numpy(batch_indices(len(data), bs, it, 0))]
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    def loop(build, bs: int, full: bool) -> float:
        net, data, loss_of = build()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        sched = make_scheduler(opt, "cosine", args.iters, warmup=10) if full else None
        step = TrainStep("loss", opt, lambda b, it: (loss_of(b), {}), [net], grad_clip=1.0 if full else None,
                         scheduler=sched)  # fmt: skip
        ema = {"net": EMA(net, 0.999)} if full else None
        with tempfile.TemporaryDirectory() as ckpt:
            t0 = time.perf_counter()
            train_loop([step], data, args.iters, bs, modules={"net": net}, ema=ema, progress=False,
                       checkpoint_dir=ckpt if full else None, checkpoint_every=50)  # fmt: skip
            return time.perf_counter() - t0

    print(f"threads={args.threads} iters={args.iters} best of {args.repeats} (reference: raw torch loop, same run)")
    print(f"{'model':<22}{'raw ms/it':>11}{'loop ms/it':>12}{'x raw':>8}{'full ms/it':>12}{'x raw':>8}")
    for name, build, bs in (("tiny MLP (bs 64)", mlp, 64), ("AE default (bs 32)", ae, 32)):
        times = {"raw": [], "loop": [], "full": []}
        for _ in range(args.repeats):  # interleaved, so drifting load hits all three alike
            times["raw"].append(raw(build, bs))
            times["loop"].append(loop(build, bs, full=False))
            times["full"].append(loop(build, bs, full=True))
        best = {k: min(v) / args.iters * 1e3 for k, v in times.items()}
        print(
            f"{name:<22}{best['raw']:>11.3f}{best['loop']:>12.3f}{best['loop'] / best['raw']:>8.3f}"
            f"{best['full']:>12.3f}{best['full'] / best['raw']:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
