"""The base of every torch family (ae / dae / vae / cvae / flow / cyclegan and the GAN / diffusion families after
them): one config for the shared training keys, named networks ↔ safetensors-ready arrays, device placement,
seeding, the call into the one training loop (:mod:`medsynth.models.training`) and the training curves.

A family subclasses :class:`TorchFamily` with a config subclassing :class:`TorchConfig` and implements:

- ``build_modules() -> {name: nn.Module}``: fresh persistent networks (what is saved; e.g. ``{"net": ...}`` or
  ``{"g_ab": ..., "g_ba": ...}``), built from the config and from what :meth:`TorchFamily.load_extra_state`
  restored;
- ``fit``: ``self.begin_fit(seed)`` (seeds Python/NumPy/torch and resolves the device), ``self.set_modules(...)``,
  one :class:`~medsynth.models.training.TrainStep` per optimiser (``self.make_step`` builds Adam with the
  config's LR schedule and gradient clipping), ``res = self.train_steps(steps, data, seed)``, then
  ``self.fit_report(res, ...)``;
- inference through ``self.module(name)`` (the EMA weights when ``ema_decay`` is set), inputs through
  ``self.tensor(array)`` and outputs through ``self.numpy(tensor)``, so they come back as CPU numpy whatever
  the device;
- optionally ``extra_state()`` / ``load_extra_state()`` for arrays and JSON metadata that are not module
  weights (an AE's code Gaussian, the native slice size).

A minimal diffusion family (one step; EMA of the denoiser)::

    class DDPMConfig(TorchConfig):
        image_size: int = 64
        timesteps: int = 1000

    class DDPMModel(TorchFamily, Sampler):  # + the capability interfaces it declares
        family, Config, ema_modules = "ddpm", DDPMConfig, ("unet",)

        def build_modules(self):
            return {"unet": make_unet(self.config)}

        @exclusive_global_rng
        def fit(self, train, val=None, seed=0):
            self.begin_fit(seed)
            self.set_modules(self.build_modules())
            unet = self.nets["unet"]
            x0 = self.tensor(to_size(train.images, self.config.image_size))  # (N, 1, s, s) on the device

            def loss(x, it):  # ε-prediction; torch's global RNG is seeded and checkpointed by the loop
                t = torch.randint(0, self.config.timesteps, (len(x),), device=x.device)
                eps = torch.randn_like(x)
                return F.mse_loss(unet(q_sample(x, t, eps), t), eps), {}

            t0 = time.perf_counter()
            res = self.train_steps([self.make_step("loss", unet.parameters(), loss, [unet])], x0, seed)
            self.fitted = True
            return self.fit_report(res, len(train), time.perf_counter() - t0)

        @torch.no_grad()
        def sample(self, n, labels=None, seed=0):
            g = torch.Generator().manual_seed(seed)  # CPU draws: the same noise on any device
            x = self.tensor(torch.randn((n, 1, 64, 64), generator=g))
            ...  # reverse process with self.module("unet") (the EMA weights)
            return Samples(images=self.numpy(x))

A GAN (pix2pix / SPADE: paired images and label maps as a tuple; discriminator first, TTUR, EMA of G)::

    steps = [
        self.make_step("discriminator", d.parameters(), d_loss, [d], lr=cfg.disc_lr, betas=(0.5, 0.999)),
        self.make_step("generator", g.parameters(), g_loss, [g], betas=(0.5, 0.999)),
    ]
    fake = lambda batch, it: (*batch, g(one_hot(batch[1])))  # one G forward, shared by both losses
    res = self.train_steps(steps, (images, labels), seed, extra_modules={"d": d}, prepare=fake,
                           main="generator")

``d_loss`` must use ``fake.detach()``; while a step runs only its own modules require grad. A WGAN critic's 5:1
ratio is ``make_step(..., repeats=5)``; a step every other iteration is ``every=2``.

Saved state: ``{module}.{state-dict key}`` for every persistent module and ``ema.{module}.{key}`` for its EMA
shadow, as float32 (or the buffer's own dtype) numpy arrays; family extras beside them. The loss history of the
last fit is written beside the model as ``training_curves.csv`` (deterministic bytes) and
``training_curves.png``, and as TensorBoard events under ``tensorboard/`` when tensorboard is installed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from medsynth.config import StrictModel
from medsynth.errors import ConfigError, InputFileError
from medsynth.models.base import GenerativeModel
from medsynth.models.training import EMA, SCHEDULES, Data, LossFn, TrainResult, TrainStep, make_scheduler, train_loop
from medsynth.utils.seeding import seed_everything

log = logging.getLogger(__name__)

CURVES_CSV = "training_curves.csv"
CURVES_PNG = "training_curves.png"
TENSORBOARD_DIR = "tensorboard"
EMA_PREFIX = "ema."
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class TorchConfig(StrictModel):
    """Keys shared by every torch family. Families subclass it and override defaults (``steps``, ``lr``, …).

    ``device``, ``checkpoint_dir``, ``checkpoint_every`` and ``progress`` are runtime keys: they change where and
    how a fit runs, not the model, and are left out of the model hash."""

    steps: int = Field(1500, ge=0, description="training iterations (optimiser steps of the main step)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="base learning rate")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR multiplier after warm-up: constant, cosine or linear decay to 0 at `steps`"
    )
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up from lr/warmup_steps to lr")
    grad_clip: float | None = Field(None, gt=0, description="max global L2 gradient norm per optimiser")
    ema_decay: float | None = Field(None, description="EMA of the weights (e.g. 0.999); inference uses it")
    amp: bool = Field(False, description="mixed precision (float16 autocast + GradScaler); CUDA only")
    device: str = Field("auto", description="auto (CUDA when available, else cpu), cpu, cuda or cuda:N")
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(200, ge=0)
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device_spec(cls, v: str) -> str:
        v = v.strip().lower()
        if not _DEVICE.match(v):
            raise ValueError(f"device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")
        return v

    @field_validator("ema_decay")
    @classmethod
    def _ema(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1) or null, got {v}")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> TorchConfig:
        if self.steps and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} exceeds steps ({self.steps})")
        return self


def resolve_device(spec: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; an unavailable CUDA device raises :class:`ConfigError`."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.match(spec):
        raise ConfigError(f"device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} requested but CUDA is not available (use 'auto' or 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class TorchFamily(GenerativeModel):
    """Base of the torch families (see the module docstring for what a family implements)."""

    Config: ClassVar[type[StrictModel]] = TorchConfig
    #: persistent modules tracked by EMA when ``ema_decay`` is set (None: all of them)
    ema_modules: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.nets: dict[str, nn.Module] = {}
        self.ema: dict[str, EMA] = {}
        self.history: dict[str, list[float]] = {}
        self._training = False
        self._device: torch.device | None = None

    # ---- hooks for the family ------------------------------------------------------------------------
    def build_modules(self) -> dict[str, nn.Module]:
        """Fresh persistent networks by name (weights are loaded into them by :meth:`set_state`)."""
        raise NotImplementedError(f"{type(self).__name__}.build_modules")

    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON metadata beside the module weights (default: none)."""
        return {}, {}

    def load_extra_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`; called before :meth:`build_modules` on load."""

    # ---- device, tensors, modules ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The resolved ``device`` setting (``auto`` → CUDA when available, else CPU)."""
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    def tensor(self, array: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A numpy array (or CPU tensor) as a tensor on the model's device (float32 by default)."""
        t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
        return t.to(device=self.device, dtype=dtype)

    @staticmethod
    def numpy(t: torch.Tensor) -> np.ndarray:
        """A tensor on any device as a CPU numpy array (float32 for floating tensors)."""
        t = t.detach()
        return (t.float() if t.is_floating_point() else t).cpu().numpy()

    def set_modules(self, modules: Mapping[str, nn.Module]) -> None:
        """Install freshly built persistent networks (moved to the device); drops any EMA of earlier ones."""
        for name in modules:
            if not name or "." in name:
                raise ValueError(f"modules: names must be non-empty and without dots, got {name!r}")
        self.nets = {name: m.to(self.device) for name, m in modules.items()}
        self.ema = {}

    def module(self, name: str) -> nn.Module:
        """The network ``name`` as the model uses it now: during :meth:`train_steps` the trained weights, otherwise
        the EMA weights when the model has them, else the trained weights."""
        if not self._training and name in self.ema:
            return self.ema[name].module
        try:
            return self.nets[name]
        except KeyError:
            raise KeyError(f"{self.family}: no module {name!r}; modules: {sorted(self.nets)}") from None

    # ---- fitting ---------------------------------------------------------------------------------------
    def begin_fit(self, seed: int) -> torch.Generator:
        """Seed Python / NumPy / torch (call under :func:`~medsynth.utils.seeding.exclusive_global_rng`, before
        building networks), resolve the device and clear the previous fit's history; returns a CPU generator."""
        g = seed_everything(seed)
        log.info("%s: fitting on %s (seed %d)", self.family, self.device, seed)
        self.history = {}
        return g

    def begin_slice_fit(self, train: Any, seed: int) -> None:
        """The preamble of a fit on image slices: check ``train`` (a SliceSet of (N, 1, H, W) images), seed
        (:meth:`begin_fit`), install :meth:`build_modules` (built after seeding, so the seed fixes the initial
        weights) and remember the native (H, W) for resizing samples back."""
        from medsynth.models.latent.common import check_slices

        check_slices(train, self.family)
        self.begin_fit(seed)
        self.set_modules(self.build_modules())
        self.native = train.image_size

    def make_step(
        self,
        name: str,
        parameters: Iterable[torch.nn.Parameter],
        loss: LossFn,
        modules: Sequence[nn.Module],
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        every: int = 1,
        repeats: int = 1,
    ) -> TrainStep:
        """A :class:`TrainStep` with Adam at ``lr`` (default: the config's), the config's LR schedule /
        warm-up over ``steps`` and its ``grad_clip``."""
        cfg = self.config
        opt = torch.optim.Adam(list(parameters), lr=cfg.lr if lr is None else lr, betas=betas)
        sched = make_scheduler(opt, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
        return TrainStep(name, opt, loss, tuple(modules), every=every, repeats=repeats, grad_clip=cfg.grad_clip,
                         scheduler=sched)  # fmt: skip

    def train_steps(
        self,
        steps: Sequence[TrainStep],
        data: Data,
        seed: int,
        *,
        extra_modules: Mapping[str, nn.Module] | None = None,
        prepare: Callable[[Any, int], Any] | None = None,
        main: str | None = None,
    ) -> TrainResult:
        """Run the one training loop with the config's shared keys over the persistent networks plus
        ``extra_modules`` (trained and checkpointed but not saved, e.g. a GAN's discriminators). ``data``
        must already be on :attr:`device`. Sets up EMA of :attr:`ema_modules` when ``ema_decay`` is set."""
        cfg = self.config
        extra = dict(extra_modules or {})
        clash = set(extra) & set(self.nets)
        if clash:
            raise ValueError(f"extra_modules: names {sorted(clash)} are already persistent modules")
        targets = self.ema_modules if self.ema_modules is not None else tuple(self.nets)
        ema = {n: EMA(self.nets[n], cfg.ema_decay) for n in targets} if cfg.ema_decay else {}
        self._training = True
        try:
            res = train_loop(
                steps, data, cfg.steps, cfg.batch_size, modules={**self.nets, **extra}, seed=seed, ema=ema,
                prepare=prepare, device=self.device, amp=cfg.amp, checkpoint_dir=cfg.checkpoint_dir,
                checkpoint_every=cfg.checkpoint_every, desc=f"fit {self.family}", progress=cfg.progress, main=main,
            )  # fmt: skip
        finally:
            self._training = False
        self.ema = ema
        self.history = res.history
        return res

    def fit_report(self, res: TrainResult, n_train: int, elapsed_s: float) -> dict[str, Any]:
        """The shared part of the fit report: family, :meth:`TrainResult.report` and ``last_<log>`` values."""
        return {
            "family": self.family,
            **res.report(n_train, self.config.batch_size, elapsed_s),
            **{f"last_{k}": v for k, v in res.logs.items()},
        }

    # ---- state -----------------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self._require_fitted()
        arrays: dict[str, np.ndarray] = {}
        for name, m in self.nets.items():
            arrays.update(_state_arrays(name + ".", m))
        for name, e in self.ema.items():
            arrays.update(_state_arrays(f"{EMA_PREFIX}{name}.", e.module))
        extra, meta = self.extra_state()
        clash = [k for k in extra if k in arrays or k.startswith(EMA_PREFIX)]
        if clash:
            raise ValueError(f"extra_state: array names {clash} clash with module weights")
        arrays.update(extra)
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if self._device is None:
            try:
                self._device = resolve_device(self.config.device)
            except ConfigError as err:
                # a model trained with device: cuda must still load on a CPU-only machine (device is runtime-only)
                log.warning("%s: %s; loading on cpu", self.family, err)
                self._device = torch.device("cpu")
        self.load_extra_state(arrays, meta)
        self.set_modules(self.build_modules())
        for name, m in self.nets.items():
            _load_arrays(self.family, name, m, arrays, name + ".")
            m.eval()
            if any(k.startswith(f"{EMA_PREFIX}{name}.") for k in arrays):
                # the decay only matters for further updates, which a loaded model does not make
                e = EMA(m, self.config.ema_decay or 0.999)
                _load_arrays(self.family, f"{EMA_PREFIX}{name}", e.module, arrays, f"{EMA_PREFIX}{name}.")
                self.ema[name] = e
        self.fitted = True

    # ---- artefacts beside the saved model ----------------------------------------------------------
    def write_artifacts(self, directory: Path) -> None:
        """Training curves of the last fit (CSV, PNG, TensorBoard when installed); nothing for a loaded model."""
        if self.history:
            write_curves(self.history, Path(directory), title=f"{self.family} training curves")


def _state_arrays(prefix: str, module: nn.Module) -> dict[str, np.ndarray]:
    return {prefix + k: np.array(v.detach().cpu()) for k, v in module.state_dict().items()}


def _load_arrays(family: str, name: str, module: nn.Module, arrays: Mapping[str, np.ndarray], prefix: str) -> None:
    n = len(prefix)
    state = {k[n:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise InputFileError(f"{family}: saved weights of module {name!r} do not match its config: {err}") from None


# ---- training curves ----------------------------------------------------------------------------------------
def write_curves(history: Mapping[str, Sequence[float]], directory: Path, title: str = "training curves") -> list[Path]:
    """Write ``history`` (column → one value per iteration, NaN where absent) as ``training_curves.csv``
    (columns ``step`` = iterations done, then each series; shortest round-trip float text, empty for NaN:
    identical values give identical bytes) and ``training_curves.png`` (one titled panel per series, per-step
    values and a moving mean, no timestamps in the file), and as TensorBoard scalars under ``tensorboard/``
    when tensorboard is importable. Returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(history)
    n = max((len(v) for v in history.values()), default=0)
    csv_path = directory / CURVES_CSV
    lines = [",".join(["step", *columns])]
    for i in range(n):
        cells = [str(i + 1)]
        for c in columns:
            v = history[c][i] if i < len(history[c]) else math.nan
            cells.append("" if math.isnan(v) else repr(float(v)))
        lines.append(",".join(cells))
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths = [csv_path, _plot_curves(history, directory / CURVES_PNG, title)]
    tb = _tensorboard(history, directory / TENSORBOARD_DIR)
    return paths + ([tb] if tb else [])


def _plot_curves(history: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    constant, columns = [], []
    for c in history:
        y = np.asarray(history[c], dtype=np.float64)
        y = y[np.isfinite(y)]
        if len(y) > 1 and np.all(y == y[0]):
            constant.append(f"{c} = {y[0]:.4g}")  # a flat panel tells nothing; named in a footnote instead
        else:
            columns.append(c)
    ncols = min(3, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    # the object API, not pyplot: no global backend switch, no figure registry, safe in worker threads
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for k, c in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        y = np.asarray(history[c], dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], lw=0.7, alpha=0.45, color="tab:blue", label="per step")
        w = max(1, int(ok.sum()) // 50)
        if ok.sum() > 2 * w > 1:
            mean = np.convolve(y[ok], np.ones(w) / w, mode="valid")
            ax.plot(x[ok][w - 1 :], mean, lw=1.4, color="tab:orange", label=f"moving mean ({w} steps)")
        tail = y[ok][len(y[ok]) // 2 :]
        spread = float(np.subtract(*np.percentile(tail, [75, 25]))) if len(tail) > 3 else 0.0
        if spread > 0 and np.ptp(y[ok]) > 50 * spread:
            # an early drop of orders of magnitude would flatten the rest: symmetric log keeps both readable
            ax.set_yscale("symlog", linthresh=max(spread, float(np.median(np.abs(tail)))))
        ax.set_title(c)
        ax.set_xlabel("step (iteration)")
        ax.set_ylabel(c)
        ax.legend(fontsize=7, loc="best")
    if not columns:
        fig.add_subplot(1, 1, 1).set_title("no varying losses logged")
    fig.suptitle(title + (f"  (constant: {', '.join(constant)})" if constant else ""))
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _tensorboard(history: Mapping[str, Sequence[float]], log_dir: Path) -> Path | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: torch raises ImportError (or others) without it
        return None
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for c, values in history.items():
            for i, v in enumerate(values):
                if not math.isnan(v):
                    writer.add_scalar(f"train/{c}", float(v), i + 1)
    finally:
        writer.close()
    return log_dir


__all__ = [
    "CURVES_CSV",
    "CURVES_PNG",
    "SCHEDULES",
    "TorchConfig",
    "TorchFamily",
    "resolve_device",
    "write_curves",
]
