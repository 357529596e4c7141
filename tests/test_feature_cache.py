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


def test_features_are_cached_per_device():
    """A GPU run validates on the GPU and evaluates on the CPU with the same images: a feature
    computed on one device is never returned for the other (it would be a tensor on the wrong
    device, and other float numbers)."""
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=2)
    cache = FeatureCache()
    cache.features(model.vision, fingerprint(model.vision), batch["pixel_values"])
    assert {enc for enc, _ in cache.store} == {f"{fingerprint(model.vision)}@cpu"}


def _spy_on_moves(monkeypatch) -> list:
    """``(data_ptr, device)`` of every ``Tensor.to`` call from now on (until ``monkeypatch.undo()``)."""
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append((self.data_ptr(), args[0] if args else kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return moved


def test_evaluation_inputs_follow_the_model_and_outputs_the_caller(monkeypatch):
    """``logits`` moves its inputs to the model's device and returns on the caller's: the choice
    evaluation builds CPU batches, and the validation callback runs while Lightning holds the model
    on the accelerator (which no CPU test has: here the move is observed on its way)."""
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=2)
    moved = _spy_on_moves(monkeypatch)
    pos = batch["attention_mask"].bool()
    out = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], positions=pos)
    monkeypatch.undo()
    device = model.lm.get_input_embeddings().weight.device
    assert [d for _, d in moved[:3]] == [device, device, device]  # input ids, mask, pixels, before anything runs
    assert out.device == batch["input_ids"].device and out.shape[0] == int(pos.sum())


def test_text_scoring_inputs_follow_the_model(monkeypatch):
    """The forgetting curve scores the text suite while Lightning holds the model on the
    accelerator: ``text_hidden`` moves ids, mask and position ids to the model's device."""
    from fusionbench.model import text_hidden

    model = tiny_model("mlp")
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(ids)
    pos = torch.tensor([[0, 1, 2]])
    moved = _spy_on_moves(monkeypatch)
    text_hidden(model, ids, mask, position_ids=pos)
    monkeypatch.undo()
    device = model.lm.get_input_embeddings().weight.device
    assert {(t.data_ptr(), device) for t in (ids, mask, pos)} <= set(moved)
