"""ma_ln (mPLUG-Owl2's modality-adaptive LayerNorm): which norms get image copies, on each LM
family, and that the copies are what image rows run. The contract, text-rows, prefix-cache and
efficiency tests pick the strategy up by themselves."""
from __future__ import annotations

import pytest
import torch

from fusionbench.errors import FusionBenchError
from fusionbench.fusion.inject import ImageRowExpert, injected
from fusionbench.model import IMAGE_TOKEN_ID
from tests.helpers import image_batch, tiny_model

LLAMA_LIKE = ("input_layernorm", "post_attention_layernorm")
NORMS = {"llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma": LLAMA_LIKE, "gpt2": ("ln_1", "ln_2")}


@pytest.mark.parametrize("arch", sorted(NORMS))
def test_every_layer_norm_gets_an_image_copy_the_last_layer_only_before_attention(arch):
    model = tiny_model("ma_ln", f"lm.tiny.arch={arch}")
    from fusionbench.fusion._lm import decoder_layers

    path, layers = decoder_layers(model.lm)
    got = {n.split(".", 1)[1] for n, _ in injected(model.lm)}
    last = len(layers) - 1
    want = {f"{path}.{i}.{norm}" for i in range(len(layers)) for norm in (NORMS[arch][:1] if i == last else NORMS[arch])}
    assert got == {w.split(".", 1)[1] for w in want}
    assert all(isinstance(m, ImageRowExpert) for _, m in injected(model.lm))
    # what trains: the projector and the norm copies, nothing of the LM itself
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    copies = {n for n in trainable if ".expert." in n}
    assert copies and all(n.startswith(("fusion.", "lm.")) for n in trainable)
    assert trainable - copies == {n for n in trainable if n.startswith("fusion.")}
    for _, layer in injected(model.lm):  # each copy starts equal to the LM's own norm
        base = dict(layer.base_layer.named_parameters())
        assert base and all(torch.equal(p, base[n]) for n, p in layer.expert.named_parameters())


def test_image_rows_run_the_copies():
    model = tiny_model("ma_ln").eval()
    batch, _ = image_batch(model)
    args = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        before = model.logits(*args)
        for _, layer in injected(model.lm):
            layer.expert.weight.mul_(3.0)
        after = model.logits(*args)
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    first = int(image.float().argmax(dim=1).min())
    assert torch.equal(before[:, :first], after[:, :first])  # text before the image: the frozen norms
    assert not torch.allclose(before[:, first:], after[:, first:])  # the image rows (and what reads them) moved


def test_layers_option_and_a_layer_without_norms():
    model = tiny_model("ma_ln", "fusion.layers=[0]")
    assert {n.split(".")[-1] for n, _ in injected(model.lm)} == {"input_layernorm", "post_attention_layernorm"}
    assert len(injected(model.lm)) == 2
    with pytest.raises(FusionBenchError, match="fusion.layers"):
        tiny_model("ma_ln", "fusion.layers=[99]")
