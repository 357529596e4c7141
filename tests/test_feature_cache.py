"""The frozen-encoder feature cache: same features as computing them, each image encoded once,
never shared between different encoders (seeds, injected modules), never used while the encoder trains."""
import torch

from fusionbench.feature_cache import CACHE, FeatureCache, fingerprint
from tests.helpers import image_batch, tiny_model


def _counting(encoder):
    calls = []
    handle = encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_cached_features_equal_computed_ones_and_each_image_is_encoded_once():
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=4)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        direct = model.vision(pixels)
    cache = FeatureCache()
    key = fingerprint(model.vision)
    calls, handle = _counting(model.vision)
    first = cache.features(model.vision, key, pixels)
    again = cache.features(model.vision, key, pixels)
    mixed = cache.features(model.vision, key, torch.cat([pixels[:2], pixels[:1] + 0.5]))
    handle.remove()
    assert torch.allclose(first, direct, atol=1e-6) and torch.equal(first, again)
    assert calls == [4, 1]  # the second call is all hits; the mixed batch encodes only the new image
    assert torch.equal(mixed[:2], first[:2]) and cache.hits == 6 and cache.misses == 5


def test_model_forward_is_the_same_with_and_without_the_cache():
    CACHE.clear()
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=4)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    model.feature_cache = False
    off = model(*args).loss
    model.feature_cache = True
    on1, on2 = model(*args).loss, model(*args).loss
    assert torch.allclose(off, on1, atol=1e-6) and torch.equal(on1, on2)
    assert CACHE.misses == 4 and CACHE.hits == 4


def test_different_encoders_never_share_entries_and_a_trainable_encoder_is_not_cached():
    a = tiny_model("mlp", "seed=0")
    b = tiny_model("mlp", "seed=1")  # random-init tiny encoders: other weights, same architecture
    assert fingerprint(a.vision) != fingerprint(b.vision)
    assert fingerprint(a.vision) == fingerprint(tiny_model("mlp", "seed=0").vision)
    CACHE.clear()
    batch, _ = image_batch(a, n=2)
    fa, fb = a.encode_images(batch["pixel_values"]), b.encode_images(batch["pixel_values"])
    assert not torch.allclose(fa, fb)
    for p in a.vision.parameters():
        p.requires_grad_(True)
    before = CACHE.misses + CACHE.hits
    out = a.encode_images(batch["pixel_values"])
    assert out.requires_grad and CACHE.misses + CACHE.hits == before


def test_cache_is_bounded():
    cache = FeatureCache(max_mb=1 / 1024)  # 1 KiB
    enc = torch.nn.Flatten()
    key = "flatten"
    for i in range(10):
        cache.features(enc, key, torch.full((1, 64), float(i)))  # 256 bytes each
    assert cache.bytes <= 1024 and len(cache.store) == 4
