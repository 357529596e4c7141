"""Q-Former and Flamingo specifics beyond the registry-wide contract (tiny tier, CPU, fp32)."""
from pathlib import Path

import pytest
import torch

from fusionbench.config import load_config
from fusionbench.errors import FusionBenchError
from fusionbench.fusion import fusion_options
from fusionbench.fusion.flamingo import FlamingoLayer
from fusionbench.model import IMAGE_TOKEN_ID
from tests.helpers import image_batch, text_batch, tiny_cfg, tiny_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "fusion"


def _base_logits(ids, mask, *overrides, pixel_values=None):
    from fusionbench.assets.lm import load_lm

    cfg = tiny_cfg(*overrides)
    lm, _ = load_lm(cfg.lm, seed=cfg.seed)
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits


def _image_logits(model, batch):
    with torch.no_grad():
        return model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def _text_logits(model):
    ids, mask = text_batch(model)
    with torch.no_grad():
        return model.logits(ids, mask), ids, mask


def _set_gates(model, attn: float, ff: float):
    with torch.no_grad():
        for layer in model.fusion.gated_layers:
            layer.xattn.attn_gate.fill_(attn)
            layer.xattn.ff_gate.fill_(ff)


# -- Q-Former ----------------------------------------------------------------------------------------
def test_qformer_gives_num_queries_image_tokens():
    model = tiny_model("{name: qformer, num_queries: 7}")
    assert model.num_image_tokens == 7
    batch, _ = image_batch(model)
    assert int((batch["input_ids"][0] == IMAGE_TOKEN_ID).sum()) == 7
    features = model.encode_images(batch["pixel_values"])
    assert model.fusion.image_embeddings(features).shape == (2, 7, model.lm.config.hidden_size)


def test_qformer_cross_attention_every_second_block():
    model = tiny_model("{name: qformer, num_layers: 5, cross_attention_every: 2}")
    assert [b.cross_attn is not None for b in model.fusion.blocks] == [True, False, True, False, True]
    model = tiny_model("{name: qformer, num_layers: 3, cross_attention_every: 1}")
    assert all(b.cross_attn is not None for b in model.fusion.blocks)


def test_qformer_image_changes_the_output_and_default_width_is_small():
    model = tiny_model("qformer")
    assert model.fusion.hidden_size == min(model.lm.config.hidden_size, 256)
    batch, _ = image_batch(model)
    other = batch["pixel_values"].flip(0)
    with torch.no_grad():
        a = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = model.logits(batch["input_ids"], batch["attention_mask"], other)
    assert (a - b).abs().max().item() > 1e-5


@pytest.mark.parametrize("bad, match", [("num_queries: 0", r"fusion.num_queries=0 is out of range for strategy .qformer.: it must be >= 1"),
                                        ("num_heads: 5", "fusion.num_heads=5 does not divide")])
def test_qformer_bad_options_are_clear_errors(bad, match):
    with pytest.raises(FusionBenchError, match=match):
        tiny_model(f"{{name: qformer, {bad}}}")


# -- Flamingo ----------------------------------------------------------------------------------------
def test_flamingo_gates_start_at_zero_and_untrained_model_is_the_base_lm_with_images():
    model = tiny_model("flamingo")
    model.eval()
    layers = model.fusion.gated_layers
    assert len(layers) == model.lm.config.num_hidden_layers  # cross_attention_every=1 by default
    for layer in layers:
        assert layer.xattn.attn_gate.item() == 0.0 and layer.xattn.ff_gate.item() == 0.0
    assert model.num_image_tokens == 0
    batch, _ = image_batch(model)
    assert not bool((batch["input_ids"] == IMAGE_TOKEN_ID).any())
    with_image = _image_logits(model, batch)
    base = _base_logits(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(with_image, base)


def test_flamingo_open_gates_condition_on_the_image_but_text_only_stays_the_base_lm():
    model = tiny_model("flamingo")
    model.eval()
    _set_gates(model, 0.5, 0.5)
    batch, _ = image_batch(model)
    a = _image_logits(model, batch)
    assert (a - _base_logits(batch["input_ids"], batch["attention_mask"])).abs().max().item() > 1e-4
    b = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"].flip(0))
    assert (a - b).abs().max().item() > 1e-5  # depends on which image
    text, ids, mask = _text_logits(model)
    assert torch.equal(text, _base_logits(ids, mask))
    assert model.fusion.text_invariant
    # conditioning is cleared after each call
    assert all(layer.conditioning.get("latents") is None for layer in model.fusion.gated_layers)


def test_flamingo_text_path_drift_moves_text_only_logits_and_base_lm_recovers_them():
    model = tiny_model("{name: flamingo, text_path_drift: true}")
    model.eval()
    assert model.fusion.text_invariant is False
    text, ids, mask = _text_logits(model)
    assert torch.equal(text, _base_logits(ids, mask))  # zero gates: still the base LM
    _set_gates(model, 0.0, 0.5)
    drifted, _, _ = _text_logits(model)
    assert (drifted - _base_logits(ids, mask)).abs().max().item() > 1e-4  # OpenFlamingo's FFN on text
    with model.fusion.base_lm(model):
        with torch.no_grad():
            recovered = model.logits(ids, mask)
    assert torch.equal(recovered, _base_logits(ids, mask))


def test_flamingo_layer_selection_every_n_and_explicit():
    model = tiny_model("{name: flamingo, cross_attention_every: 2}")
    assert model.fusion.layers_with_cross_attention == [1, 3]
    layers = model.lm.model.layers
    assert [isinstance(layer, FlamingoLayer) for layer in layers] == [False, True, False, True]
    model = tiny_model("{name: flamingo, layer_indices: [0, -1]}")
    assert model.fusion.layers_with_cross_attention == [0, 3]
    # trainable: resampler + the wrappers' own blocks, never the wrapped decoder layers
    names = model.trainable_parameter_names()
    assert any(n.startswith("lm.model.layers.0.xattn.") for n in names)
    assert any(n.startswith("fusion.resampler.") for n in names)
    assert not any(".base_layer." in n for n in names)


@pytest.mark.parametrize("fusion, match", [
    ("{name: flamingo, layer_indices: [1, 9]}", r"fusion.layer_indices: layer 9 does not exist; this LM has layers 0..3"),
    ("{name: flamingo, layer_indices: sideways}", r"fusion.layer_indices: unknown layer selection 'sideways'"),
    ("{name: flamingo, cross_attention_every: 5}", r"cross_attention_every=5 selects no layer: this LM has 4"),
    ("{name: flamingo, num_latents: 0}", r"fusion.num_latents=0 is out of range for strategy .flamingo.: it must be >= 1"),
    ("{name: flamingo, hidden_size: 30, num_heads: 4}", r"fusion.num_heads=4 does not divide"),
])
def test_flamingo_bad_configuration_is_a_clear_error(fusion, match):
    with pytest.raises(FusionBenchError, match=match):
        tiny_model(fusion)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma"])
def test_flamingo_on_other_decoder_families(arch):
    from fusionbench.data.format import Collator

    model = tiny_model("{name: flamingo, cross_attention_every: 2}", f"lm.tiny.arch={arch}")
    assert len(model.fusion.gated_layers) == 2
    batch, rows = image_batch(model)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    out.loss.backward()
    gates = [layer.xattn.attn_gate.grad for layer in model.fusion.gated_layers]
    assert all(g is not None and g.abs().item() > 0 for g in gates)
    model.eval()
    # zero gates: the base LM with images; open gates: image-conditioned, text-only still the base
    ov = f"lm.tiny.arch={arch}"
    assert torch.equal(_image_logits(model, batch), _base_logits(batch["input_ids"], batch["attention_mask"], ov))
    _set_gates(model, 0.5, 0.5)
    text, ids, mask = _text_logits(model)
    assert torch.equal(text, _base_logits(ids, mask, ov))
    prompts = Collator(model.tokenizer, model.vision.preprocess, 0, 512, with_answer=False)(rows)
    new = model.generate(prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], max_new_tokens=3)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3


def test_flamingo_cached_generation_keeps_cross_attending_to_the_image():
    """Greedy generation with the KV cache equals step-by-step full recomputation with the image,
    so each new token reads the image latents during cached decoding."""
    from fusionbench.data.format import Collator

    model = tiny_model("flamingo")
    model.eval()
    _set_gates(model, 1.0, 1.0)
    _, rows = image_batch(model)
    prompts = Collator(model.tokenizer, model.vision.preprocess, 0, 512, with_answer=False)(rows)
    ids, mask, pix = prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"]
    new = model.generate(ids, mask, pix, max_new_tokens=4, eos_token_id=None)
    ref = []
    with torch.no_grad():
        for _ in range(new.shape[1]):
            nxt = model.logits(ids, mask, pix)[:, -1].argmax(-1, keepdim=True)
            ref.append(nxt)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(new, torch.cat(ref, 1))
    text_new = model.generate(*text_batch(model), None, max_new_tokens=2)
    assert text_new.shape[0] == 2


def test_experiment_yamls_load_with_valid_fusion_options():
    for name in ("qformer", "flamingo"):
        cfg = load_config(EXPERIMENTS / f"{name}.yaml")
        assert cfg.name == name and cfg.fusion.name == name
        assert cfg.results_file == "results/local/strategies.jsonl"
        fusion_options(cfg.fusion)


def test_flamingo_yaml_layer_selection_on_a_smollm2_shaped_lm():
    """30 layers, hidden 576 (SmolLM2-135M's shape), random weights: the YAML's selection."""
    cfg = load_config(EXPERIMENTS / "flamingo.yaml")
    opts = dict(cfg.fusion)
    fusion = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else ('null' if v is None else v)}"
                             for k, v in opts.items()) + "}"
    model = tiny_model(fusion, "lm.tiny.hidden_size=576", "lm.tiny.num_hidden_layers=30",
                       "lm.tiny.num_attention_heads=9", "lm.tiny.num_key_value_heads=3",
                       "lm.tiny.intermediate_size=64")
    assert model.fusion.layers_with_cross_attention == [3, 7, 11, 15, 19, 23, 27]
