"""Prefix and LoRA fusion beyond the contract: exact base-LM recovery, bad targets, other decoder
families, prefix cache geometry, and agreement of forward / logits / generate behind a prefix."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusionbench.assets.lm import load_lm
from fusionbench.data.format import Collator
from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import cache_kwarg, output_cache, passed_cache
from fusionbench.model import IGNORE_INDEX
from tests.helpers import image_batch, text_batch, tiny_cfg, tiny_model


def _base_logits(ids, mask, arch="llama"):
    cfg = tiny_cfg(f"lm.tiny.arch={arch}")
    lm, _ = load_lm(cfg.lm, seed=cfg.seed)
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits


def _train_a_little(model, steps=2, text=False):
    batch, _ = image_batch(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        if text:
            ids, mask, labels = _text_labels(model)
            model(ids, mask, None, labels).loss.backward()
        else:
            model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
        opt.step()
    model.eval()


def _text_labels(model):
    ids, mask = text_batch(model)
    return ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


def _prompts(model, with_image=True):
    """Generation prompts of different lengths (left padding exercised), two different images."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for q in ["What color is it?", "Where is the small object in this picture?"]:
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
        rows.append({"image": Image.fromarray(pixels), "question": q, "answer": "red", "qtype": "attribute"})
    return Collator(model.tokenizer, model.vision.preprocess if with_image else None, model.num_image_tokens, 512,
                    with_answer=False, with_image=with_image)(rows)


def _check_forward_backward_and_generate(model):
    batch, rows = image_batch(model)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None]
    # every parameter gets a real gradient (LoRA A only once B moves away from 0)
    assert not [n for n, p in trainable.items() if ".lora_A." not in n and not p.grad.abs().sum()]
    model.eval()
    prompts = _prompts(model)
    gen = model.generate(prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], max_new_tokens=3)
    assert gen.shape[0] == 2 and 1 <= gen.shape[1] <= 3
    text = _prompts(model, with_image=False)
    assert model.generate(text["input_ids"], text["attention_mask"], None, max_new_tokens=3).shape[0] == 2


# -- LoRA -----------------------------------------------------------------------------------------
def test_lora_untrained_is_exactly_the_base_lm():
    model = tiny_model("{name: lora, r: 4}")
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)
    ids, mask = text_batch(model)
    with torch.no_grad():
        assert torch.equal(model.logits(ids, mask), _base_logits(ids, mask))


def test_lora_base_lm_recovers_base_after_training_and_adapters_come_back():
    model = tiny_model("{name: lora, r: 4}")
    ids, mask = text_batch(model)
    base = _base_logits(ids, mask)
    _train_a_little(model)
    with torch.no_grad():
        after = model.logits(ids, mask)
        with model.fusion.base_lm(model):
            recovered = model.logits(ids, mask)
        again = model.logits(ids, mask)
    assert (after - base).abs().max().item() > 1e-4
    assert (recovered - base).abs().max().item() <= 1e-6
    assert torch.equal(again, after)


def test_lora_trains_projector_and_lora_only_with_the_configured_rank():
    model = tiny_model("{name: lora, r: 4, target_modules: [q_proj, v_proj]}")
    names = model.trainable_parameter_names()
    assert {n.split(".")[0] for n in names} == {"fusion", "lm"}
    lora = [n for n in names if n.startswith("lm.")]
    assert all((".lora_A." in n or ".lora_B." in n) and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert len(lora) == 2 * 2 * model.lm.config.num_hidden_layers
    a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    assert a.shape[0] == 4


def test_lora_all_linear_default_covers_every_linear_in_the_decoder_blocks():
    from peft.tuners.lora import LoraLayer

    model = tiny_model("lora")
    wrapped = {n.split(".layers.")[1].split(".", 1)[1] for n, m in model.lm.named_modules()
               if isinstance(m, LoraLayer)}
    assert wrapped == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("targets, match", [("[nonexistent_proj]", "nonexistent_proj"),
                                            ("[q_proj, bogus]", "bogus"),
                                            ("'model\\.nothing\\..*'", "matches no Linear")])
def test_lora_bad_target_modules_is_a_clear_error(targets, match):
    with pytest.raises(FusionBenchError, match=match):
        tiny_model(f"{{name: lora, target_modules: {targets}}}")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_on_other_decoder_families(arch):
    from peft.tuners.lora import LoraLayer

    model = tiny_model("{name: lora, r: 4}", f"lm.tiny.arch={arch}")
    layers = [m for m in model.lm.modules() if isinstance(m, LoraLayer)]
    assert layers
    if arch == "gpt2":  # Conv1D stores its weight transposed
        assert all(m.fan_in_fan_out for m in layers)
    _check_forward_backward_and_generate(model)


# -- prefix ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, pooling", [("llama", "tokens"), ("gpt2", "pooled")])
def test_prefix_cache_has_every_layer_with_the_prefix_length(arch, pooling):
    model = tiny_model(f"{{name: prefix, prefix_length: 5, pooling: {pooling}}}", f"lm.tiny.arch={arch}")
    assert model.num_image_tokens == 0
    batch, _ = image_batch(model)
    features = model.encode_images(batch["pixel_values"])
    kwargs = model.fusion.lm_kwargs(model, features, batch["attention_mask"])
    cache = passed_cache(kwargs)
    t = model.lm.config.get_text_config()
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    assert len(cache.layers) == t.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, kv_heads, 5, t.hidden_size // t.num_attention_heads)
    assert kwargs["attention_mask"].shape[1] == batch["attention_mask"].shape[1] + 5
    assert kwargs["position_ids"][0, 0].item() == 5  # text positions start after the prefix


def test_prefix_logits_depend_on_the_image():
    model = tiny_model("prefix").eval()
    batch, _ = image_batch(model)
    ids, mask, pixels = batch["input_ids"][:1], batch["attention_mask"][:1], batch["pixel_values"]
    with torch.no_grad():
        a = model.logits(ids, mask, pixels[:1])
        b = model.logits(ids, mask, pixels[1:2])
    assert (a - b).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prefix_forward_logits_and_generate_agree(arch):
    model = tiny_model("prefix", f"lm.tiny.arch={arch}").eval()
    # training forward (right padding) == cross-entropy of logits
    batch, _ = image_batch(model)
    with torch.no_grad():
        loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).lm_loss
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    labels = batch["labels"][:, 1:]
    ref = F.cross_entropy(logits[:, :-1][labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    assert torch.allclose(loss, ref, atol=1e-5)
    # generate (left padding, pre-filled cache) == logits at the last position, two steps
    p = _prompts(model)
    ids, mask, pixels = p["input_ids"], p["attention_mask"], p["pixel_values"]
    assert (mask == 0).any()
    with torch.no_grad():
        gen = model.generate(ids, mask, pixels, max_new_tokens=2, min_new_tokens=2, output_logits=True,
                             return_dict_in_generate=True)
        first = model.logits(ids, mask, pixels)[:, -1]
        tok = gen.sequences[:, :1]
        second = model.logits(torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1), pixels)[:, -1]
    assert gen.sequences.shape == (2, 2)  # new tokens only
    assert torch.equal(tok[:, 0], first.argmax(-1))
    assert torch.allclose(gen.logits[0], first, atol=1e-4)
    assert torch.allclose(gen.logits[1], second, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_prefix_on_other_decoder_families(arch):
    model = tiny_model("prefix", f"lm.tiny.arch={arch}")
    ids, mask = text_batch(model)
    with torch.no_grad():
        assert torch.equal(model.logits(ids, mask), _base_logits(ids, mask, arch))
    _check_forward_backward_and_generate(model)


def test_prefix_peft_task_prefix_changes_text_and_base_lm_recovers_it():
    model = tiny_model("{name: prefix, prefix_length: 4, task_prefix_tokens: 3}")
    assert not model.fusion.text_invariant
    assert any(n.startswith("lm.prompt_encoder.") for n in model.trainable_parameter_names())
    batch, _ = image_batch(model)
    features = model.encode_images(batch["pixel_values"])
    assert passed_cache(model.fusion.lm_kwargs(model, features, batch["attention_mask"])).get_seq_length() == 7
    _check_forward_backward_and_generate(model)
    _train_a_little(model, text=True)  # the task prefix also trains from text-only batches
    ids, mask = text_batch(model)
    base = _base_logits(ids, mask)
    with torch.no_grad():
        text = model.logits(ids, mask)
        with model.fusion.base_lm(model):
            recovered = model.logits(ids, mask)
        # text-only forward (through the decoder) sees the same task prefix as logits
        ids, mask, labels = _text_labels(model)
        loss = model(ids, mask, None, labels).lm_loss
    assert (text - base).abs().max().item() > 1e-4
    assert (recovered - base).abs().max().item() <= 1e-6
    shift = labels[:, 1:]
    assert torch.allclose(loss, F.cross_entropy(text[:, :-1][shift != IGNORE_INDEX], shift[shift != IGNORE_INDEX]),
                          atol=1e-5)
    # text-only generate carries the task prefix: its first step equals the text logits
    p = _prompts(model, with_image=False)
    with torch.no_grad():
        gen = model.generate(p["input_ids"], p["attention_mask"], None, max_new_tokens=1, output_logits=True,
                             return_dict_in_generate=True)
        last = model.logits(p["input_ids"], p["attention_mask"])[:, -1]
    assert torch.allclose(gen.logits[0], last, atol=1e-4)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_prefix_task_prefix_is_added_once_whichever_keyword_the_cache_comes_by(name):
    """transformers 5.24 renamed the decoder's KV-cache keyword ``past_key_values`` -> ``cache``.
    ``generate`` passes its cache (which already holds the task prefix) under the new name; the
    text-only hook must see it under either name, else it adds the prefix a second time and the
    mask/positions no longer match the cache (the 126 vs 129 rotary error)."""
    import inspect

    from transformers import DynamicCache

    model = tiny_model("{name: prefix, prefix_length: 4, task_prefix_tokens: 3}")
    decoder = model.lm.get_decoder()
    assert cache_kwarg(decoder) in inspect.signature(type(decoder).forward).parameters
    ids, mask = text_batch(model)
    with model.fusion.text_only(model):
        assert model.fusion._text_prefix_hook(decoder, (), {"input_ids": ids, "attention_mask": mask,
                                                            name: DynamicCache()}) is None
        _, kwargs = model.fusion._text_prefix_hook(decoder, (), {"input_ids": ids, "attention_mask": mask})
    assert set(kwargs) >= {cache_kwarg(decoder), "attention_mask", "position_ids"}
    assert passed_cache(kwargs).get_seq_length() == 3 and kwargs["attention_mask"].shape[1] == ids.shape[1] + 3
    with torch.no_grad():  # the cache a forward returns is found under either transformers version
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=True)
    assert output_cache(out).get_seq_length() == ids.shape[1]


def test_prefix_bad_options_are_clear_errors():
    with pytest.raises(FusionBenchError, match="prefix_length"):
        tiny_model("{name: prefix, prefix_length: 0}")
    with pytest.raises(FusionBenchError, match="pooling"):
        tiny_model("{name: prefix, pooling: max}")
