"""Offline feature extractors for fidelity metrics: a fixed-seed random CNN and an in-project domain encoder.

Both map images (N, 1, H, W) float32 to features (N, D) float64. The network is a small strided CNN; the
feature vector concatenates the global average of every stage (multi-scale, D = sum of the widths).
Weights are stored as safetensors plus a JSON description; the content hash covers both, so every metric
row can name exactly which network produced it. Nothing is downloaded; loading never executes code.

An InceptionV3 / RadImageNet extractor is not provided: without torchvision the architecture would have to
be re-implemented by hand to match third-party weight files, which is out of scope here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch import nn

from medsynth.errors import InputFileError, TrainingError
from medsynth.utils.atomic import atomic_dir
from medsynth.utils.hashing import sha256_arrays, sha256_json
from medsynth.utils.seeding import exclusive_global_rng

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "extractor.json"


class _Encoder(nn.Module):
    """Strided 3×3 conv stages (each: conv stride 2 → ReLU → conv → ReLU); returns every stage's output."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.widths = tuple(widths)
        stages = []
        c_in = 1
        for w in self.widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()
                )
            )
            c_in = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _numpy_init(encoder: _Encoder, seed: int) -> None:
    """He-normal weights and zero biases drawn from a NumPy PCG64 stream: bit-identical on every machine."""
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("weight"):
                fan_in = int(np.prod(p.shape[1:]))
                w = gen.standard_normal(size=tuple(p.shape)) * np.sqrt(2.0 / fan_in)
                p.copy_(torch.from_numpy(w.astype(np.float32)))
            else:
                p.zero_()


@dataclass
class FeatureExtractor:
    """A frozen encoder turning images (N, 1, H, W) into pooled features (N, D).

    ``kind`` is ``random_cnn`` or ``domain_encoder``; images are resized (bilinear) to ``input_size``²
    and clipped to ``clip`` before encoding so intensity outliers (bright scar) cannot dominate.
    """

    kind: str
    widths: tuple[int, ...]
    input_size: int
    state: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    clip: tuple[float, float] = (-0.5, 2.0)

    def __post_init__(self) -> None:
        if self.input_size < 2 ** len(self.widths):
            raise ValueError(f"input_size: {self.input_size} too small for {len(self.widths)} stride-2 stages")
        self._net = _Encoder(self.widths)
        self._net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state.items()})
        self._net.eval()

    @property
    def name(self) -> str:
        return self.kind

    @property
    def dim(self) -> int:
        return int(sum(self.widths))

    def description(self) -> dict[str, Any]:
        """JSON-able description of the architecture (hashed together with the weights)."""
        return {
            "kind": self.kind,
            "widths": list(self.widths),
            "input_size": self.input_size,
            "clip": list(self.clip),
            "info": self.info,
        }

    @property
    def hash(self) -> str:
        """Content hash (first 16 hex chars) of weights + description."""
        desc = {k: v for k, v in self.description().items() if k != "info"}
        return sha256_json({"weights": sha256_arrays(self.state), "desc": desc})[:16]

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Features (N, D) float64 of images (N, 1, H, W)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected (N, 1, H, W), got {images.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = _prepare(torch.from_numpy(images[i : i + batch_size]), self.input_size, self.clip)
                feats = [s.mean(dim=(2, 3)) for s in self._net(x)]
                out.append(torch.cat(feats, dim=1).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    def save(self, out_dir: str | Path) -> Path:
        """Write ``weights.safetensors`` and ``extractor.json`` (with the hash) atomically to ``out_dir``."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.state.items()}, str(tmp / WEIGHTS_FILE))
            meta = {**self.description(), "hash": self.hash}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out_dir


def _prepare(x: torch.Tensor, size: int, clip: tuple[float, float]) -> torch.Tensor:
    x = x.float().clamp(*clip)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _state_numpy(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in net.state_dict().items()}


def random_cnn(seed: int = 0, widths: tuple[int, ...] = (32, 64, 128, 256), input_size: int = 128) -> FeatureExtractor:
    """Randomly initialised CNN with weights from ``numpy.random.default_rng(seed)`` (reproducible anywhere)."""
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"widths: positive channel counts required, got {widths}")
    net = _Encoder(tuple(widths))
    _numpy_init(net, seed)
    return FeatureExtractor("random_cnn", tuple(widths), input_size, _state_numpy(net), info={"seed": seed})


class _AutoEncoder(nn.Module):
    """Encoder + light decoder reconstructing the image and (when labels exist) predicting the labels."""

    def __init__(self, widths: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        self.encoder = _Encoder(widths)
        ups = []
        for c_in, c_out in zip(widths[::-1], list(widths[::-1][1:]) + [16], strict=True):
            ups.append(nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()))
        self.decoder = nn.Sequential(*ups)
        self.head = nn.Conv2d(16, 1 + n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)[-1]))


@exclusive_global_rng
def train_domain_encoder(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 16,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    input_size: int = 64,
    lr: float = 2e-3,
    num_threads: int = 1,
) -> FeatureExtractor:
    """Train a convolutional autoencoder on real training slices and return its encoder as an extractor.

    ``images`` (N, 1, H, W) float32 real *training* slices; ``labels`` (N, H, W) canonical codes, optional:
    when given, the decoder also predicts them (cross-entropy), so the features encode anatomy, not just
    texture. Deterministic for a given seed on a given machine (torch CPU). Trains with ``num_threads``
    torch threads (restored afterwards; 1 is often fastest on a busy small machine).
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))
    try:
        return _train_domain_encoder(images, labels, seed, steps, batch_size, tuple(widths), input_size, lr)
    finally:
        torch.set_num_threads(prev)


def _train_domain_encoder(
    images: np.ndarray,
    labels: np.ndarray | None,
    seed: int,
    steps: int,
    batch_size: int,
    widths: tuple[int, ...],
    input_size: int,
    lr: float,
) -> FeatureExtractor:
    from medsynth.labels import N_CLASSES
    from medsynth.utils.seeding import seed_everything

    if steps <= 0:
        raise ValueError(f"steps: must be positive, got {steps}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        raise ValueError(f"images: expected non-empty (N, 1, H, W), got {images.shape}")
    gen = seed_everything(seed)
    n_cls = N_CLASSES if labels is not None else 0
    model = _AutoEncoder(tuple(widths), n_cls)
    _numpy_init(model.encoder, seed)
    clip = (-0.5, 2.0)
    x_all = _prepare(torch.from_numpy(images), input_size, clip)
    y_all = None
    if labels is not None:
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))[:, None].float()
        y_all = F.interpolate(y, size=(input_size, input_size), mode="nearest")[:, 0].long()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x = x_all[idx]
        out = model(x)
        loss = F.mse_loss(out[:, :1], x)
        if y_all is not None:
            loss = loss + 0.1 * F.cross_entropy(out[:, 1:], y_all[idx])
        if not torch.isfinite(loss):
            raise TrainingError(f"domain encoder: non-finite loss at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
    log.info("domain encoder trained: %d steps, final loss %.4f", steps, loss_val)
    info = {"seed": seed, "steps": steps, "n_train": len(images), "final_loss": round(loss_val, 6)}
    return FeatureExtractor("domain_encoder", tuple(widths), input_size, _state_numpy(model.encoder), info=info)


def load_extractor(path: str | Path) -> FeatureExtractor:
    """Load a saved extractor (safetensors + JSON, no code execution) and verify its content hash."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise InputFileError(f"{path}: not an extractor folder (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state = load_file(str(weights_path))
        ext = FeatureExtractor(
            kind=meta["kind"],
            widths=tuple(meta["widths"]),
            input_size=int(meta["input_size"]),
            state=state,
            info=meta.get("info", {}),
            clip=tuple(meta.get("clip", (-0.5, 2.0))),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InputFileError(f"{path}: unreadable extractor: {err}") from None
    if meta.get("hash") and meta["hash"] != ext.hash:
        raise InputFileError(f"{meta_path}: content hash mismatch ({meta['hash']} recorded, {ext.hash} computed)")
    return ext


def get_extractor(spec: str, seed: int = 0) -> FeatureExtractor:
    """``random_cnn`` (fixed-seed) or a path to a saved extractor folder."""
    if spec == "random_cnn":
        return random_cnn(seed=seed)
    return load_extractor(spec)
