"""The prompt-prefix KV cache of training forwards: the same loss and gradients as the uncached
forward for every strategy that declares ``frozen_text_prefix`` (also after training, on decoder
families with rotary and with absolute positions), never used by the others."""
import pytest
import torch

from fusionbench.evaluation.efficiency import efficiency
from fusionbench.fusion import FUSIONS
from helpers import image_batch, tiny_model, train_a_few_steps

CACHED = [n for n in FUSIONS.names() if FUSIONS.get(n).frozen_text_prefix_for(FUSIONS.get(n).default_options())]
UNCACHED = [n for n in FUSIONS.names() if n not in CACHED]


def test_declarations():
    assert {"linear", "mlp", "qformer", "c_abstractor", "moe", "moe_scratch", "visual_expert"} <= set(CACHED)
    assert {"lora", "full_finetune", "prefix", "flamingo"} <= set(UNCACHED)


def _loss_and_grads(model, batch, cache: bool):
    model.cache_text_prefix = cache
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads


def _check_equal(model, batch):
    model.train()
    calls = []
    original = model._prefix_cache
    model._prefix_cache = lambda ids, b: calls.append(len(ids)) or original(ids, b)
    loss_c, grads_c = _loss_and_grads(model, batch, cache=True)
    assert calls and calls[0] > 3, "the shared system prompt was not cached"
    loss_u, grads_u = _loss_and_grads(model, batch, cache=False)
    assert len(calls) == 1  # the uncached forward does not touch the cache
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_u.keys() and grads_c
    for n in grads_u:
        torch.testing.assert_close(grads_c[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("strategy", CACHED)
def test_cached_prefix_equals_uncached_forward(strategy):
    model = tiny_model(strategy)
    train_a_few_steps(model)  # experts / projector no longer at their initialisation
    batch, _ = image_batch(model, n=3)
    _check_equal(model, batch)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_cached_prefix_other_families(arch):
    model = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    batch, _ = image_batch(model, n=3)
    _check_equal(model, batch)


@pytest.mark.parametrize("strategy", UNCACHED)
def test_strategies_that_change_the_prefix_never_cache(strategy):
    model = tiny_model(strategy)
    batch, _ = image_batch(model, n=2)
    assert model.shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"]) == 0


def test_prefix_length_stops_at_differences_padding_images_and_labels():
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=2)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    p = model.shared_prefix_length(ids, mask, labels)
    first_image = int((ids[0] == -200).nonzero()[0])
    assert 3 < p < first_image
    other = ids.clone()
    other[1, 2] = other[0, 2] + 1  # the rows differ at position 2
    assert model.shared_prefix_length(other, mask, labels) == 1
    model.cache_text_prefix = False
    assert model.shared_prefix_length(ids, mask, labels) == 0


def test_flops_count_the_whole_prompt():
    """Efficiency counts the computation itself: with or without the cache the same FLOPs."""
    model = tiny_model("mlp")
    batch, _ = image_batch(model, n=2)
    on = efficiency(model, batch)
    model.cache_text_prefix = False
    off = efficiency(model, batch)
    assert on["eff/flops_train_step"] == off["eff/flops_train_step"]
    assert model.cache_text_prefix is False
