"""Shared torch training loop for the neural families: seeded, resumable, and loud on divergence.

The loop owns the bookkeeping every family needs — a progress bar, periodic checkpoints, resume from the last
checkpoint, and a :class:`~medsynth.errors.TrainingError` naming the step when a loss turns NaN/Inf — while the
family supplies ``loss_fn(batch, step) -> (loss, logs)``. Batches are drawn from a dedicated seeded generator so
``(seed, step)`` determines the batch, which keeps a resumed run on the same batch sequence as an uninterrupted
one.

Checkpoints are ``torch.save`` of plain state dicts (module, optimizer, step, generator state, loss history)
and are read back with ``torch.load(weights_only=True)``: no code runs on resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsynth.errors import InputFileError, TrainingError
from medsynth.utils.atomic import atomic_file
from medsynth.utils.seeding import seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"

LossFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    """What :func:`train_loop` returns: the final step, per-step losses and the last step's extra logs."""

    step: int
    losses: list[float] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0

    def report(self, n_train: int, batch_size: int, elapsed_s: float) -> dict[str, Any]:
        """The training part of a family's fit report (steps, resume point, losses, throughput)."""
        trained = self.step - self.resumed_from
        return {
            "n_train": n_train,
            "steps": self.step,
            "resumed_from": self.resumed_from,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": float(np.mean(self.losses[-20:])) if self.losses else None,
            "train_images_per_s": trained * min(batch_size, n_train) / elapsed_s if trained else None,
        }


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


def save_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Atomically write a checkpoint (state dicts and plain tensors/lists only)."""
    payload = {"module": module.state_dict(), "optimizer": optimizer.state_dict(), **state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a corrupt file raises :class:`InputFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises assorted errors on truncated / foreign files
        raise InputFileError(f"{path}: unreadable checkpoint: {err}") from None


def train_loop(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    loss_fn: LossFn,
    steps: int,
    batch_size: int,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    desc: str = "train",
    progress: bool = True,
    clip_grad: float | None = None,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``module`` for ``steps`` optimizer steps on mini-batches of ``data`` (N, ...).

    ``loss_fn(batch, step)`` returns the scalar loss and a dict of floats to log. With ``checkpoint_dir`` set, a
    checkpoint is written every ``checkpoint_every`` steps and at the end, and an existing checkpoint there is
    resumed from (its step count continues; a finished run is not retrained). Raises :class:`TrainingError`
    naming the step when the loss is NaN/Inf. ``clip_grad`` clips the global gradient norm. ``extra_state``:
    further objects with ``state_dict`` / ``load_state_dict`` that ``loss_fn`` steps itself (e.g. a GAN's
    discriminator optimizer), checkpointed and resumed with the rest.
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    seed_everything(seed)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, losses = 0, []
    if ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        module.load_state_dict(ckpt["module"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        losses = [float(v) for v in ckpt.get("losses", [])]
        for name, obj in (extra_state or {}).items():
            obj.load_state_dict(ckpt["extra"][name])
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("%s: resuming from %s at step %d", desc, ckpt_path, start)
    result = TrainResult(step=start, losses=losses, resumed_from=start)
    n = int(data.shape[0])
    module.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, leave=False, initial=start, total=steps)
    for step in bar:
        batch = data[torch.from_numpy(batch_indices(n, batch_size, step, seed))]
        loss, logs = loss_fn(batch, step)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"{desc}: loss became {value} at step {step}; lower the learning rate or check inputs")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
        optimizer.step()
        losses.append(value)
        result.step, result.logs = step + 1, {k: float(v) for k, v in logs.items()}
        bar.set_postfix(loss=f"{value:.4g}")
        if ckpt_path is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0:
            _checkpoint(ckpt_path, module, optimizer, step + 1, losses, extra_state)
    if ckpt_path is not None and result.step > start:
        _checkpoint(ckpt_path, module, optimizer, result.step, losses, extra_state)
    module.eval()
    return result


def _checkpoint(
    path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, losses, extra_state=None
) -> None:
    state = {"step": step, "losses": torch.tensor(losses), "torch_rng": torch.get_rng_state()}
    if extra_state:
        state["extra"] = {name: obj.state_dict() for name, obj in extra_state.items()}
    save_checkpoint(path, module, optimizer, state)
