"""Image controls: what a model scores when the image carries no information about the question.

* :func:`derangement` pairs every item with another item's image (no item keeps its own), the
  permutation behind ``acc_shuffled`` at evaluation and ``data.images: shuffled`` in training;
* :func:`blind_images` builds the training set of a trained blind baseline (``data.images``).
"""
from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from fusionbench.errors import FusionBenchError


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` without fixed points, uniform over all such (rejection
    sampling; ~e draws), reproducible in ``seed``."""
    if n < 2:
        raise FusionBenchError(f"shuffling images needs at least 2 items, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (2 ** 63), n, 0xD3]))
    idx = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == idx):
            return perm


def _blank_png(example_bytes: bytes | None) -> bytes:
    size = (64, 64)
    if example_bytes:
        with Image.open(io.BytesIO(example_bytes)) as im:
            size = im.size
    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def blind_images(ds: datasets.Dataset, mode: str, seed: int) -> datasets.Dataset:
    """``ds`` with its ``image`` column replaced for a blind baseline: ``shuffled`` (a fixed
    derangement: each question meets another example's picture) or ``blank`` (one grey image of
    the first image's size); ``real`` returns ``ds`` unchanged."""
    if mode == "real":
        return ds
    if mode not in ("shuffled", "blank"):
        raise FusionBenchError(f"data.images must be 'real', 'shuffled' or 'blank', got {mode!r}")
    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    if mode == "shuffled":
        perm = derangement(len(raw), seed)
        new = [raw[int(j)] for j in perm]
    else:
        blank = {"bytes": _blank_png(raw[0].get("bytes") if raw else None), "path": None}
        new = [blank] * len(raw)
    return ds.remove_columns("image").add_column("image", new, feature=datasets.Image())
