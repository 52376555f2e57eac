"""Offline feature extractors: reproducible random CNN, trained domain encoder, safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsynth.errors import InputFileError
from medsynth.evaluation.features import get_extractor, load_extractor, random_cnn, train_domain_encoder


def _images(n: int = 12, size: int = 32, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cy, cx, r = g.uniform(0.35, 0.65), g.uniform(0.35, 0.65), g.uniform(0.1, 0.25)
        img = (np.hypot(yy - cy, xx - cx) < r).astype(np.float32) + 0.05 * g.standard_normal((size, size))
        out.append(img[None])
    return np.stack(out).astype(np.float32)


def test_random_cnn_weights_come_from_numpy_stream():
    ext = random_cnn(seed=3, widths=(4, 8), input_size=16)
    # first tensor of the stream: He-normal draw from PCG64(seed) — identical on every platform
    first = np.random.default_rng(3).standard_normal((4, 1, 3, 3)) * np.sqrt(2.0 / 9)
    np.testing.assert_array_equal(ext.state["stages.0.0.weight"], first.astype(np.float32))
    assert all(not v.any() for k, v in ext.state.items() if k.endswith("bias"))


def test_random_cnn_deterministic_and_seed_sensitive():
    x = _images()
    a, b, c = random_cnn(seed=0, input_size=32), random_cnn(seed=0, input_size=32), random_cnn(seed=1, input_size=32)
    assert a.hash == b.hash != c.hash
    fa = a(x)
    assert fa.shape == (len(x), a.dim) and fa.dtype == np.float64
    np.testing.assert_array_equal(fa, b(x))
    assert not np.allclose(fa, c(x))


def test_extractor_rejects_bad_layout():
    with pytest.raises(ValueError, match="images"):
        random_cnn(input_size=32)(np.zeros((2, 32, 32), np.float32))


def test_save_load_roundtrip_and_tamper_detection(tmp_path):
    ext = random_cnn(seed=5, widths=(8, 16), input_size=32)
    ext.save(tmp_path / "ext")
    back = load_extractor(tmp_path / "ext")
    assert back.hash == ext.hash and back.kind == "random_cnn"
    x = _images()
    np.testing.assert_array_equal(back(x), ext(x))
    assert get_extractor(str(tmp_path / "ext")).hash == ext.hash
    meta = json.loads((tmp_path / "ext" / "extractor.json").read_text(encoding="utf-8"))
    meta["widths"] = [8, 16]
    meta["input_size"] = 64  # changes the description → hash no longer matches
    (tmp_path / "ext" / "extractor.json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match="hash mismatch"):
        load_extractor(tmp_path / "ext")
    with pytest.raises(InputFileError, match="not an extractor"):
        load_extractor(tmp_path / "missing")


def test_domain_encoder_learns_and_differs_from_random(tmp_path):
    x = _images(24)
    labels = (x[:, 0] > 0.5).astype(np.uint8)
    short = train_domain_encoder(x, labels, seed=0, steps=2, widths=(8, 16), input_size=32)
    longer = train_domain_encoder(x, labels, seed=0, steps=25, widths=(8, 16), input_size=32)
    assert longer.info["final_loss"] < short.info["final_loss"]
    assert longer.kind == "domain_encoder" and longer.hash != random_cnn(0, (8, 16), 32).hash
    again = train_domain_encoder(x, labels, seed=0, steps=25, widths=(8, 16), input_size=32)
    assert again.hash == longer.hash  # same seed, same machine → same weights
    longer.save(tmp_path / "enc")
    np.testing.assert_allclose(load_extractor(tmp_path / "enc")(x), longer(x))
