"""Features of a frozen vision encoder, computed once per image and reused across steps, epochs and
strategies (a sweep's points share one process-wide cache).

The key of an image is (fingerprint of the encoder, hash of its preprocessed pixels): the fingerprint
hashes the encoder's structure, parameters and buffers, so a different seed of a random-init encoder,
another checkpoint or injected modules (e.g. MoE vision experts) never share entries. An encoder with
trainable parameters is never cached. ``vision.feature_cache: false`` turns the cache off.

Features computed for a whole batch are stored per image; a later batch that mixes cached and new
images computes only the new ones, so a value can differ from the uncached batch computation by
float rounding of the convolution kernels for another batch shape (|Δ| ~1e-6), never more.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn


def fingerprint(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(module).encode())
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pixel_keys(pixel_values: torch.Tensor) -> list[str]:
    rows = pixel_values.detach().cpu().reshape(pixel_values.shape[0], -1).contiguous()
    return [hashlib.blake2b(r.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest() for r in rows]


class FeatureCache:
    """A bounded LRU map ``(encoder fingerprint, pixel hash) -> features[N, D]``."""

    def __init__(self, max_mb: float = 2048):
        self.max_bytes = int(max_mb * 2**20)
        self.store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.store.clear()
        self.bytes = 0
        self.hits = self.misses = 0

    def features(self, encoder: nn.Module, encoder_key: str, pixel_values: torch.Tensor) -> torch.Tensor:
        # features computed under autocast (bf16 training) are other numbers, in another dtype, than
        # the float32 ones evaluation outside autocast needs: each is cached under its own key
        # features are cached per device: a GPU run validates on the GPU and evaluates its test set on
        # the CPU (where Lightning leaves the model after fit), with the same images
        encoder_key = f"{encoder_key}@{pixel_values.device}"
        device = pixel_values.device.type
        if torch.is_autocast_enabled(device):
            encoder_key = f"{encoder_key}@autocast-{torch.get_autocast_dtype(device)}"
        keys = [(encoder_key, k) for k in pixel_keys(pixel_values)]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                new = encoder(pixel_values[missing] if len(missing) < len(keys) else pixel_values)
            for i, feats in zip(missing, new):
                self._put(keys[i], feats.detach().clone())
        out = []
        for k in keys:
            self.store.move_to_end(k)
            out.append(self.store[k])
        return torch.stack(out)

    def _put(self, key, value: torch.Tensor) -> None:
        if key in self.store:
            return
        self.store[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self.store) > 1:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


#: the process-wide cache (shared by every model built in this process)
CACHE = FeatureCache()
