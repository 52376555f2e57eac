"""Noise schedules and samplers of the diffusion families, on top of MONAI's ``DDPMScheduler`` /
``DDIMScheduler``.

**The DDIM timestep fix.** In MONAI 1.6.1, ``DDIMScheduler.set_timesteps(N)`` sets the sequence
``linspace(T − 1, 0, N).round()`` while ``DDIMScheduler.step`` jumps to ``t − T // N``. The two agree only when
``N`` divides ``T − 1`` exactly in the right way; otherwise (e.g. T = 1000, N = 50: the sequence steps by
~20.39, ``step`` by 20) each step's "previous" ᾱ is not the ᾱ of the timestep the next step is called with, the
trajectory is inconsistent and the last step never reaches ᾱ = 1. :class:`CorrectedDDIMScheduler` takes the
previous timestep from the sequence actually set (``self.timesteps``): the step after ``timesteps[i]`` goes to
``timesteps[i + 1]``, and the last one to the clean image (ᾱ_prev = ``final_alpha_cumprod``). The same holds for
any sequence assigned to ``timesteps`` by hand (a partial trajectory from t₀, as anomaly scoring uses).

Step noise (η > 0) is passed in by the caller (drawn from its own generator), so a sample is the same on any
device given the same seed, and MONAI's device-bound generator handling is not needed.

Intensities: the families map the slice scale (p1 → 0, p99 → 1, not clipped above) to the model scale with
``y = 2x − 1`` (p1 → −1, p99 → 1); ``clip_sample`` bounds the predicted x₀ to a range with headroom beyond
[−1, 1] (default x ∈ [−0.25, 1.75], i.e. y ∈ [−1.5, 2.5]) because scar and fat are brighter than the 99th
percentile and clipping at 1 would flatten them.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler


class CorrectedDDIMScheduler(DDIMScheduler):
    """MONAI's DDIM scheduler whose ``step`` goes to the next timestep of ``self.timesteps`` (see module doc)."""

    def prev_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in the sequence set; −1 (the clean image) after the last one."""
        seq = [int(t) for t in self.timesteps]
        t = int(timestep)
        if t not in seq:
            raise ValueError(f"timestep: {t} is not in the scheduler's sequence {seq[:4]}…")
        i = seq.index(t)
        return seq[i + 1] if i + 1 < len(seq) else -1

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update (Song et al. 2021, eqs. 12 and 16) from ``timestep`` to :meth:`prev_timestep`.

        Returns (x_prev, predicted x₀). ``noise``: the standard normal draw used when ``eta > 0`` (shape of
        ``sample``); drawn from ``generator`` on the CPU when not given."""
        t = int(timestep)
        prev = self.prev_timestep(t)
        acp = self.alphas_cumprod.to(sample.device)
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else self.final_alpha_cumprod.to(sample.device)
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.clip_sample:
            x0 = torch.clamp(x0, self.clip_sample_values[0], self.clip_sample_values[1])
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2).clamp(min=0) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator).to(sample.device)
            x_prev = x_prev + std * noise
        return x_prev, x0


def make_schedulers(
    timesteps: int,
    schedule: str,
    prediction: str,
    clip: tuple[float, float] | None,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
) -> tuple[DDPMScheduler, CorrectedDDIMScheduler]:
    """The DDPM scheduler (training noise + ancestral sampling) and the corrected DDIM one over the same ᾱ.

    ``schedule``: a MONAI schedule name (``linear_beta``, ``scaled_linear_beta``, ``cosine``); ``clip``: the
    model-scale range of the predicted x₀ (None: no clipping)."""
    kw: dict = {"prediction_type": prediction}
    if clip is None:
        kw["clip_sample"] = False
    else:
        kw.update(clip_sample=True, clip_sample_min=float(clip[0]), clip_sample_max=float(clip[1]))
    sched_kw = {} if schedule == "cosine" else {"beta_start": beta_start, "beta_end": beta_end}
    ddpm = DDPMScheduler(num_train_timesteps=timesteps, schedule=schedule, **kw, **sched_kw)
    ddim = CorrectedDDIMScheduler(num_train_timesteps=timesteps, schedule=schedule, **kw, **sched_kw)
    return ddpm, ddim


def x0_from_prediction(
    scheduler: DDPMScheduler, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One-step x₀ estimate from the network output at timesteps ``t`` (B,) for ε-, v- or x₀-prediction."""
    acp = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.ndim - 1)))
    if scheduler.prediction_type == "epsilon":
        return (x_t - (1 - acp) ** 0.5 * pred) / acp**0.5
    if scheduler.prediction_type == "v_prediction":
        return acp**0.5 * x_t - (1 - acp) ** 0.5 * pred
    return pred


def ddim_timesteps(start: int, n: int) -> torch.Tensor:
    """A decreasing DDIM sequence of ``n`` distinct timesteps from ``start`` to 0 (linspace, rounded; as MONAI's
    ``set_timesteps`` does for ``start = T − 1``)."""
    if n < 1:
        raise ValueError(f"n: at least one step, got {n}")
    n = min(n, start + 1)
    return torch.linspace(start, 0, n).round().long().unique_consecutive()


__all__ = ["CorrectedDDIMScheduler", "ddim_timesteps", "make_schedulers", "x0_from_prediction"]
