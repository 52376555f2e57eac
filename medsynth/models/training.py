"""The one torch training loop of the neural families: several optimiser steps, EMA, LR schedules, gradient
clipping, mixed precision on CUDA, checkpoint/resume, a NaN guard and progress: after the first few iterations
one INFO line announces the expected length of the fit (``fit vae: 1500 steps × batch 32 on cpu; expected ≈
4.6 min (…)``), then a tqdm bar where it is the only one on the terminal, else whole log lines
(:mod:`medsynth.utils.progress`).

Network, maths and loop are kept apart (MONAI style): the family builds the networks and writes the loss
closures; :func:`train_loop` only schedules them. One *iteration* draws one batch and runs the
:class:`TrainStep` s in order — e.g. ``[discriminator, generator]`` for a GAN (each with its own optimiser, so
two learning rates give TTUR), or a single step for an autoencoder, a flow or a diffusion model. A step runs on
the iterations where ``iteration % every == 0``, ``repeats`` times (a WGAN critic's 5:1 ratio is
``repeats=5``). After the steps, every :class:`EMA` is updated and every step's LR scheduler advances once, so
schedules and EMA run on the iteration clock whatever the step ratios.

Batches are drawn from dedicated seeded permutations (:func:`batch_indices`), so ``(seed, iteration)``
determines the batch and a resumed run sees exactly the batches an uninterrupted one would. A checkpoint holds
every module, optimiser, scheduler, grad scaler and EMA state, the iteration, the loss history and the torch
RNG states; it is ``torch.save`` of plain state dicts, read back with ``torch.load(weights_only=True)`` — no
code runs on resume — so an interrupted run resumed from its checkpoint ends with the same bytes as an
uninterrupted one on CPU.

Mixed precision (``amp=True``) is used only when the device is CUDA: the losses are computed under
``torch.autocast("cuda", float16)`` and backpropagated through one ``GradScaler`` per step; on CPU the flag is
ignored and the run is the exact float32 one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.errors import InputFileError, TrainingError
from medsynth.utils.atomic import atomic_file
from medsynth.utils.progress import Progress, format_seconds

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 2  # 1: the single-optimiser loop before TrainStep (module/optimizer/step/losses/extra)

#: ``loss(batch, iteration) -> (scalar loss, {name: float} to log)``. ``batch`` is what the loop drew (a tensor,
#: or a dict of tensors for a mapping of datasets), or what ``prepare`` made of it.
LossFn = Callable[[Any, int], tuple[torch.Tensor, Mapping[str, float]]]

SCHEDULES = ("constant", "cosine", "linear")


# ---- steps, EMA, schedules ----------------------------------------------------------------------------------
@dataclass
class TrainStep:
    """One optimiser step of an iteration.

    ``name`` names the step's loss in the history, the curves and the NaN guard (``"loss"`` for a single-step
    family; ``"discriminator"`` / ``"generator"`` for a GAN). ``modules``: the networks this step trains — while
    it runs, their parameters require grad and those of the other steps' modules do not (so a generator step
    does not accumulate discriminator gradients). ``grad_clip``: max global L2 norm of the gradients of the
    optimiser's parameters (None: no clipping). ``scheduler``: advanced once per iteration (None: constant LR).
    """

    name: str
    optimizer: torch.optim.Optimizer
    loss: LossFn
    modules: Sequence[nn.Module] = ()
    every: int = 1
    repeats: int = 1
    grad_clip: float | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def __post_init__(self) -> None:
        if not self.name or "," in self.name:
            raise ValueError(f"name: a non-empty step name without commas, got {self.name!r}")
        if self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: must be > 0, got {self.grad_clip}")

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class EMA:
    """Exponential moving average of a module's weights: after iteration i (0-based)
    ``shadow ← d_i · shadow + (1 − d_i) · weight`` for every floating parameter and buffer (integer buffers,
    e.g. an ActNorm's "initialised" flag, are copied), with the warmed-up decay
    ``d_i = min(decay, (1 + i) / (10 + i))`` (the num_updates rule of TensorFlow's ExponentialMovingAverage).
    Why the warm-up: the shadow starts as a copy of the randomly initialised module, and a fixed decay keeps
    ``decay ** steps`` of those random weights: 37 % at 0.999 over 1000 steps, a large share of noise in the
    weights a diffusion model samples with. With the warm-up the early shadow follows the weights and the
    initial share is negligible (below 1e-3 % after 1000 steps at 0.999). The shadow is kept in eval mode with
    gradients off; it is the network used for inference when the family enables EMA."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.source = module
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        # Pairs of (shadow, live) tensors, resolved once: state_dict() per iteration costs more than the
        # average itself on small nets. Loading state dicts copies in place, so the references stay valid; the
        # module must not be moved to another device after the EMA is made.
        live = self.source.state_dict(keep_vars=True)
        pairs = [(t, live[k]) for k, t in self.module.state_dict(keep_vars=True).items()]
        self._float = [(a, b) for a, b in pairs if a.dtype.is_floating_point]
        self._other = [(a, b) for a, b in pairs if not a.dtype.is_floating_point]

    def decay_at(self, iteration: int) -> float:
        """The warmed-up decay used after 0-based ``iteration``."""
        return min(self.decay, (1.0 + iteration) / (10.0 + iteration))

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Average in the live weights after 0-based ``iteration`` (the loop's step: a resumed run continues the
        same decay sequence)."""
        d = self.decay_at(iteration)
        if self._float:
            shadow = [a for a, _ in self._float]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [b.detach() for _, b in self._float], alpha=1.0 - d)
        for a, b in self._other:
            a.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def schedule_factor(kind: str, iteration: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based) of ``total``: a linear warm-up ``(i + 1) / warmup``
    over the first ``warmup`` iterations, then ``constant`` (1), ``cosine`` (½(1 + cos πp)) or ``linear``
    (1 − p), where p = (i − warmup) / (total − warmup) runs from 0 towards 1."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule: one of {SCHEDULES}, got {kind!r}")
    if iteration < warmup:
        return (iteration + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int = 0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A ``LambdaLR`` following :func:`schedule_factor` (None for a constant LR without warm-up)."""
    schedule_factor(kind, 0, total, warmup)  # validates kind
    if kind == "constant" and warmup == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule_factor(kind, i, total, warmup))


# ---- batches ------------------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch for ``step``: an epoch-wise permutation seeded by ``(seed, epoch)``.

    Deterministic in ``(n, batch_size, step, seed)`` alone, so resuming at step k draws exactly the batches an
    uninterrupted run would have drawn.
    """
    if n <= 0:
        raise ValueError("n: the training set is empty")
    batch_size = min(batch_size, n)
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


Data = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor] | Callable[[int], Any]


def draw_batch(data: Data, batch_size: int, iteration: int, seed: int) -> Any:
    """The batch of ``iteration``.

    - a tensor (N, ...): its rows;
    - a tuple of tensors of equal length N (paired data: images and their label maps): the same rows of each,
      as a tuple;
    - a mapping of tensors (unpaired domains of different sizes): a dict with one batch per key, the i-th key
      drawn with seed ``seed + i``;
    - a callable: ``data(iteration)`` (it must be deterministic in the iteration for resume to be exact).
    """
    if callable(data) and not isinstance(data, torch.Tensor):
        return data(iteration)
    if isinstance(data, Mapping):
        return {k: _rows(v, batch_size, iteration, seed + i) for i, (k, v) in enumerate(data.items())}
    if isinstance(data, tuple):
        sizes = {int(t.shape[0]) for t in data}
        if len(sizes) != 1:
            raise ValueError(f"data: paired tensors must have the same length, got {sorted(sizes)}")
        idx = torch.from_numpy(batch_indices(sizes.pop(), batch_size, iteration, seed))
        return tuple(t[idx.to(t.device)] for t in data)
    return _rows(data, batch_size, iteration, seed)


def _rows(x: torch.Tensor, batch_size: int, iteration: int, seed: int) -> torch.Tensor:
    idx = torch.from_numpy(batch_indices(int(x.shape[0]), batch_size, iteration, seed))
    return x[idx.to(x.device)]


# ---- result -------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train_loop` returns.

    ``step``: iterations done (including those before a resume); ``history``: every logged scalar per iteration
    (each step's loss under its name, then the closures' logs; NaN where a step did not run that iteration);
    ``logs``: the last value of each closure log; ``main``: the step whose loss the report's ``loss_first`` /
    ``loss_last`` describe.
    """

    step: int
    history: dict[str, list[float]] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    main: str = "loss"
    device: str = "cpu"
    step_names: tuple[str, ...] = ()

    @property
    def losses(self) -> list[float]:
        """The main step's loss per iteration it ran."""
        return [v for v in self.history.get(self.main, []) if not math.isnan(v)]

    def report(self, n_train: int, batch_size: int, elapsed_s: float) -> dict[str, Any]:
        """The training part of a family's fit report (steps, resume point, losses, throughput, device)."""
        trained = self.step - self.resumed_from
        losses = self.losses
        out = {
            "n_train": n_train,
            "steps": self.step,
            "resumed_from": self.resumed_from,
            "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-20:])) if losses else None,
            "train_images_per_s": trained * min(batch_size, n_train) / elapsed_s if trained and elapsed_s else None,
            "device": self.device,
        }
        for name, values in self.history.items():
            if name != self.main and name in self.step_names:
                kept = [v for v in values if not math.isnan(v)]
                out[f"{name}_loss_last"] = float(np.mean(kept[-20:])) if kept else None
        return out


# ---- checkpoints --------------------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a corrupt file raises :class:`InputFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises assorted errors on truncated / foreign files
        raise InputFileError(f"{path}: unreadable checkpoint: {err}") from None


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


# ---- the loop -----------------------------------------------------------------------------------------------
def train_loop(
    steps: Sequence[TrainStep],
    data: Data,
    iterations: int,
    batch_size: int,
    *,
    modules: Mapping[str, nn.Module],
    seed: int = 0,
    ema: Mapping[str, EMA] | None = None,
    prepare: Callable[[Any, int], Any] | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    desc: str = "train",
    progress: bool = True,
    main: str | None = None,
) -> TrainResult:
    """Run ``iterations`` iterations of ``steps`` on mini-batches of ``data``.

    ``modules``: every network trained (checkpointed under these names; set to train mode for the loop and eval
    mode after). ``ema``: moving averages updated after every iteration. ``prepare(batch, iteration)``: optional
    forward shared by the steps of one iteration (e.g. a GAN's generated images, computed once and used by both
    the discriminator and the generator loss); its output is what the losses receive. ``device``: where
    ``data`` and ``modules`` already are (the loop moves nothing); ``amp`` takes effect only on CUDA.

    With ``checkpoint_dir`` set, a checkpoint is written every ``checkpoint_every`` iterations and at the end,
    and an existing one there is resumed from (a finished run is loaded, not retrained). A NaN/Inf loss raises
    :class:`TrainingError` naming the step, the iteration and the loss.
    """
    if iterations < 0:
        raise ValueError(f"steps: must be >= 0, got {iterations}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: must be >= 0, got {checkpoint_every}")
    if not steps:
        raise ValueError("steps: at least one TrainStep is needed")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"steps: step names must be unique, got {names}")
    main = main or names[-1]
    if main not in names:
        raise ValueError(f"main: {main!r} is not one of the steps {names}")
    ema = dict(ema or {})
    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    scalers = {s.name: torch.amp.GradScaler("cuda", enabled=use_amp) for s in steps}

    def precision() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()

    # freezing the other steps' modules only matters with several steps; one step skips the toggling
    trained = [m for s in steps for m in s.modules] if len(steps) > 1 else []

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, history = 0, {}
    if ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        start, history = _restore(ckpt_path, ckpt, steps, modules, ema, scalers, device)
        log.info("%s: resuming from %s at step %d", desc, ckpt_path, start)
    result = TrainResult(step=start, history=history, resumed_from=start, main=main, device=str(device),
                         step_names=tuple(names))  # fmt: skip

    def record(values: dict[str, float], iteration: int) -> None:
        # one row per iteration in every column; NaN where a step (or its logs) did not run
        for key, value in values.items():
            history.setdefault(key, [math.nan] * iteration).append(value)
        for column in history.values():
            if len(column) < iteration + 1:
                column.append(math.nan)

    def checkpoint(iteration: int) -> None:
        _save_checkpoint(ckpt_path, _payload(iteration, steps, modules, ema, scalers, history, device))

    for m in modules.values():
        m.train()
    work = f"{iterations - start} steps × batch {batch_size} on {device}" + (f" (from step {start})" if start else "")
    bar = Progress(iterations, desc, work, initial=start, enabled=progress, logger=log)
    t0 = time.perf_counter()
    try:
        for it in range(start, iterations):
            batch = draw_batch(data, batch_size, it, seed)
            if prepare is not None:
                with precision():
                    batch = prepare(batch, it)
            row: dict[str, float] = {}
            for st in steps:
                if it % st.every:
                    continue
                if trained:
                    _only_trainable(st, trained)
                for _ in range(st.repeats):
                    with precision():
                        loss, logs = st.loss(batch, it)
                    value = float(loss.detach().float())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"{desc}: loss {st.name!r} became {value} at step {it}; lower the learning rate or "
                            f"check inputs"
                        )
                    _optimise(st, loss, scalers[st.name])
                row[st.name] = value
                row.update({k: float(v) for k, v in logs.items()})
                result.logs.update({k: float(v) for k, v in logs.items()})
            for m in trained:
                m.requires_grad_(True)
            for e in ema.values():
                e.update(it)
            for st in steps:
                if st.scheduler is not None:
                    st.scheduler.step()
            record(row, it)
            result.step = it + 1
            bar.update({k: row[k] for k in names if k in row} if main in row else None)
            if ckpt_path is not None and checkpoint_every > 0 and (it + 1) % checkpoint_every == 0:
                checkpoint(it + 1)
    finally:
        for m in trained:
            m.requires_grad_(True)
        bar.close()
    if result.step > start:
        log.info("%s: %d steps in %s", desc, result.step - start, format_seconds(time.perf_counter() - t0))
    if ckpt_path is not None and result.step > start:
        checkpoint(result.step)
    for m in modules.values():
        m.eval()
    return result


def _only_trainable(step: TrainStep, trained: list[nn.Module]) -> None:
    """Gradients only for this step's modules (the others are frozen while it runs; a module in both is on)."""
    for m in trained:
        m.requires_grad_(False)
    for m in step.modules:
        m.requires_grad_(True)


def _optimise(step: TrainStep, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
    step.optimizer.zero_grad(set_to_none=True)
    if not scaler.is_enabled():  # float32: the plain path, no scaler bookkeeping per step
        loss.backward()
        if step.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(step.parameters(), step.grad_clip)
        step.optimizer.step()
        return
    scaler.scale(loss).backward()
    if step.grad_clip is not None:
        scaler.unscale_(step.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(step.parameters(), step.grad_clip)
    scaler.step(step.optimizer)
    scaler.update()


def _payload(iteration, steps, modules, ema, scalers, history, device) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "step": iteration,
        "modules": {name: m.state_dict() for name, m in modules.items()},
        "optimizers": {s.name: s.optimizer.state_dict() for s in steps},
        "schedulers": {s.name: s.scheduler.state_dict() for s in steps if s.scheduler is not None},
        "scalers": {name: sc.state_dict() for name, sc in scalers.items() if sc.is_enabled()},
        "ema": {name: e.state_dict() for name, e in ema.items()},
        "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in history.items()},
        "torch_rng": torch.get_rng_state(),
    }
    if device.type == "cuda":
        payload["cuda_rng"] = torch.cuda.get_rng_state(device)
    return payload


def _restore(path, ckpt, steps, modules, ema, scalers, device) -> tuple[int, dict[str, list[float]]]:
    if not isinstance(ckpt, dict):
        raise InputFileError(f"{path}: not a medsynth training checkpoint")
    try:
        return _restore_states(path, ckpt, steps, modules, ema, scalers, device)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # shapes / keys of another configuration
        raise InputFileError(f"{path}: checkpoint does not match this model's configuration: {err}") from None


def _restore_states(path, ckpt, steps, modules, ema, scalers, device) -> tuple[int, dict[str, list[float]]]:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(
            f"{path}: checkpoint written by an older medsynth training loop (format {ckpt.get('format', 1)}); "
            f"delete that folder to retrain"
        )

    def need(section: str, names) -> dict:
        have = ckpt.get(section, {})
        missing = sorted(set(names) - set(have))
        if missing:
            raise InputFileError(f"{path}: checkpoint has no {section} {missing}; it belongs to another model")
        return have

    for name, state in need("modules", modules).items():
        if name in modules:
            modules[name].load_state_dict(state)
    optimizers = need("optimizers", [s.name for s in steps])
    schedulers = need("schedulers", [s.name for s in steps if s.scheduler is not None])
    for s in steps:
        s.optimizer.load_state_dict(optimizers[s.name])
        if s.scheduler is not None:
            s.scheduler.load_state_dict(schedulers[s.name])
    for name, state in ckpt.get("scalers", {}).items():
        if name in scalers and scalers[name].is_enabled():
            scalers[name].load_state_dict(state)
    for name, state in need("ema", ema).items():
        if name in ema:
            ema[name].load_state_dict(state)
    torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    history = {k: [float(x) for x in v.tolist()] for k, v in ckpt.get("history", {}).items()}
    return int(ckpt["step"]), history
