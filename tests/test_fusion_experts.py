"""Beyond the contract: visual experts (CogVLM), co-upcycled MoE connectors (CuMo), full finetuning."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fusionbench.errors import FusionBenchError
from fusionbench.fusion.moe import UpcycledMoE
from fusionbench.fusion.inject import ImageRowExpert, TokenRouting
from fusionbench.model import IMAGE_TOKEN_ID
from tests.helpers import image_batch, text_batch, tiny_cfg, tiny_model


def _perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _experts(model):
    return [m for m in model.lm.modules() if isinstance(m, ImageRowExpert)]


def _image_inputs(model, batch):
    """LM inputs of one image batch: spliced embeddings and the image mask."""
    with torch.no_grad():
        embeds, image_mask = model.embed(batch["input_ids"], model.encode_images(batch["pixel_values"]))
    return embeds, image_mask


def _fresh_lm(*overrides):
    from fusionbench.assets.lm import load_lm

    cfg = tiny_cfg(*overrides)
    return load_lm(cfg.lm, seed=cfg.seed)[0]


# -- visual expert ------------------------------------------------------------------------------

ARCH_PROJECTIONS = {"llama": 7, "qwen2": 7, "gpt2": 4}  # q,k,v,o,gate,up,down | c_attn,c_proj,c_fc,c_proj
ARCH_INJECTED = {"llama": 5, "qwen2": 5, "gpt2": 3}     # q,k,v,o + the mlp block | c_attn,c_proj + the mlp block
LAST_LAYER_KV = {"llama": 2, "qwen2": 2, "gpt2": 1}    # the LM's last layer: k,v | the fused c_attn


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_visual_expert_wraps_every_projection_of_each_layer(arch):
    """Attention projections one by one, the MLP block whole (one row split for gate/up/down):
    every projection of every layer has an expert copy, the last layer k / v only."""
    model = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    n_layers = tiny_cfg().lm.tiny.num_hidden_layers
    experts = _experts(model)
    assert len(experts) == ARCH_INJECTED[arch] * (n_layers - 1) + LAST_LAYER_KV[arch]
    copied = [m for e in experts for m in e.expert.modules() if hasattr(m, "weight") and m.weight.dim() == 2]
    assert len(copied) == ARCH_PROJECTIONS[arch] * (n_layers - 1) + LAST_LAYER_KV[arch]
    for m in experts:  # initialised from the LM's own weights, separate tensors
        for (n, a), (_, b) in zip(m.base_layer.named_parameters(), m.expert.named_parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
            assert not a.requires_grad and b.requires_grad
    trainable = set(model.trainable_parameter_names())
    assert trainable == {n for n in trainable if n.startswith("fusion.") or ".expert." in n}
    assert len([n for n in trainable if ".expert." in n]) == sum(len(list(m.expert.parameters())) for m in experts)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_visual_expert_forward_flops_equal_the_base_lm(arch):
    """The expert replaces the base matmul on image rows, it never adds one: same FLOPs as the
    base LM on the same sequence (images included)."""
    model = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    batch, _ = image_batch(model)
    embeds, image_mask = _image_inputs(model, batch)
    assert image_mask.any() and not image_mask.all()
    mask = batch["attention_mask"]
    with torch.no_grad(), model.fusion.conditioning(model, None, image_mask), FlopCounterMode(display=False) as ours:
        model.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    base_lm = _fresh_lm(f"lm.tiny.arch={arch}")
    with torch.no_grad(), FlopCounterMode(display=False) as base:
        base_lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    assert ours.get_total_flops() > 0
    assert ours.get_total_flops() == base.get_total_flops()


def _routed_linear():
    """A seeded Linear(16, 24), its routing and its ImageRowExpert with an expert unlike the base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    routing = TokenRouting()
    layer = ImageRowExpert(base, routing)
    _perturb(layer.expert.parameters(), scale=0.5)
    return base, routing, layer


def test_expert_linear_routed_equals_unrouted_reference():
    base, routing, layer = _routed_linear()
    x = torch.randn(3, 10, 16)
    mask = torch.rand(3, 10) < 0.4
    with routing.set(image_mask=mask):
        routed = layer(x)
        reference = torch.where(mask.unsqueeze(-1), layer.expert(x), base(x))  # dense: both weights everywhere
        assert (routed - reference).abs().max().item() <= 1e-6
        # longer input than the mask (new tokens): the extra positions are text
        longer = torch.randn(3, 12, 16)
        ref = torch.where(torch.cat([mask, mask.new_zeros(3, 2)], 1).unsqueeze(-1), layer.expert(longer), base(longer))
        assert (layer(longer) - ref).abs().max().item() <= 1e-6
        # a decode step (shorter than the mask): exactly the base layer
        step = torch.randn(3, 1, 16)
        assert torch.equal(layer(step), base(step))
    assert torch.equal(layer(x), base(x))  # no routing state: the base layer


def test_routing_plans_the_mask_when_it_is_set_and_restores_state_after_a_bad_one():
    """The image-row plan is made by ``set()`` (outside compiled blocks), nested masks get their own
    plan back on exit, and a mask of the wrong shape is plan()'s one clear error at the forward, with
    the previous state restored afterwards."""
    base, routing, layer = _routed_linear()
    x = torch.randn(2, 6, 16)
    outer, inner = torch.rand(2, 6) < 0.5, torch.rand(2, 6) < 0.5
    with routing.set(image_mask=outer):
        assert 6 in routing._plans  # made by set(), before any forward
        expected = layer(x)
        with routing.set(image_mask=inner):
            assert not torch.equal(layer(x), expected)
        assert torch.equal(layer(x), expected)  # the outer mask's plan again
        with pytest.raises(FusionBenchError, match="does not match the image mask"):
            with routing.set(image_mask=torch.ones(3, 6, dtype=torch.bool)):  # another batch size
                layer(x)
        assert torch.equal(layer(x), expected)
    assert routing.get("image_mask") is None and routing._plans == {}
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_visual_expert_model_routed_equals_unrouted_reference(arch, monkeypatch):
    model = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    _perturb([p for m in _experts(model) for p in m.expert.parameters()], scale=0.05)
    model.eval()
    batch, _ = image_batch(model)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        routed = model.logits(*args)

    def unrouted(self, x):  # image rows via the expert weights computed densely, then selected
        mask = self.conditioning.get("image_mask")
        if mask is None or x.shape[1] != mask.shape[1]:
            return self.base_layer(x)
        return torch.where(mask.unsqueeze(-1), self.expert(x), self.base_layer(x))

    monkeypatch.setattr(ImageRowExpert, "forward", unrouted)
    with torch.no_grad():
        reference = model.logits(*args)
    assert (routed - reference).abs().max().item() <= 1e-6


def test_each_weight_sees_only_its_own_tokens():
    """Gather, not "run both and select": experts get exactly the image rows, base layers the text rows."""
    model = tiny_model("visual_expert")
    batch, _ = image_batch(model)
    n_image = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    n_all = batch["input_ids"].numel()
    rows = {"expert": set(), "base": set()}
    hooks = []
    for m in _experts(model):
        hooks.append(m.expert.register_forward_hook(lambda mod, inp, out: rows["expert"].add(inp[0].shape[0])))
        hooks.append(m.base_layer.register_forward_hook(lambda mod, inp, out: rows["base"].add(inp[0].shape[0])))
    with torch.no_grad():
        model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    for h in hooks:
        h.remove()
    assert rows == {"expert": {n_image}, "base": {n_all - n_image}}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_untrained_visual_expert_equals_mlp_with_the_same_projector(arch):
    ve = tiny_model("visual_expert", f"lm.tiny.arch={arch}")
    mlp = tiny_model("mlp", f"lm.tiny.arch={arch}")
    _perturb(ve.fusion.projector.parameters(), scale=0.1)
    mlp.fusion.projector.load_state_dict(ve.fusion.projector.state_dict())
    batch, _ = image_batch(ve)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        a, b = ve.logits(*args), mlp.logits(*args)
    assert (a - b).abs().max().item() <= 1e-5
    ids, mask = text_batch(ve)
    with torch.no_grad():
        assert torch.equal(ve.logits(ids, mask), mlp.logits(ids, mask))


def test_text_positions_never_use_expert_weights():
    """Perturbing the experts leaves every hidden state before the first image token unchanged
    and gives those positions no gradient path into expert parameters."""
    model = tiny_model("visual_expert")
    model.eval()
    batch, _ = image_batch(model)
    embeds, image_mask = _image_inputs(model, batch)
    first = int(image_mask.float().argmax(1).min())
    assert first > 0
    decoder = model.lm.get_decoder()

    def hidden():
        with model.fusion.conditioning(model, None, image_mask):
            return decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           output_hidden_states=True, use_cache=False).hidden_states

    before = [h.detach() for h in hidden()]
    expert_params = [p for m in _experts(model) for p in m.expert.parameters()]
    _perturb(expert_params, scale=0.5)
    after = hidden()
    for a, b in zip(before, after):
        assert torch.equal(a[:, :first], b[:, :first].detach())
    assert (before[-1][:, first:] - after[-1][:, first:].detach()).abs().max() > 1e-3  # image tokens: changed
    after[-1][:, :first].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in expert_params)


def test_cached_generation_treats_new_tokens_as_text():
    """Cached greedy decoding equals argmax of a full non-cached forward over prompt + new tokens
    (new tokens are text, routed through the base weights)."""
    from fusionbench.data.format import Collator

    model = tiny_model("visual_expert")
    _perturb([p for m in _experts(model) for p in m.expert.parameters()], scale=0.2)
    model.eval()
    _, rows = image_batch(model)
    p = Collator(model.tokenizer, model.vision.preprocess, model.num_image_tokens, 512, with_answer=False)(rows)
    new = model.generate(p["input_ids"], p["attention_mask"], p["pixel_values"], max_new_tokens=4,
                         eos_token_id=None)
    assert new.shape[1] == 4
    full = torch.cat([p["input_ids"], new], 1)
    mask = torch.cat([p["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        logits = model.logits(full, mask, p["pixel_values"])
    t = p["input_ids"].shape[1]
    assert torch.equal(logits[:, t - 1:-1].argmax(-1), new)


def test_visual_expert_layer_selection():
    model = tiny_model("{name: visual_expert, layers: top_half}")
    names = {n for n, m in model.lm.named_modules() if isinstance(m, ImageRowExpert)}
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)
    model = tiny_model("{name: visual_expert, layers: [0, -1]}")
    names = {n for n, m in model.lm.named_modules() if isinstance(m, ImageRowExpert)}
    assert {n.split(".layers.")[1].split(".")[0] for n in names} == {"0", "3"}


def test_visual_expert_layers_out_of_range_is_a_clear_error():
    with pytest.raises(FusionBenchError, match=r"layer 7 does not exist; this LM has layers 0\.\.3"):
        tiny_model("{name: visual_expert, layers: [0, 7]}")


# -- MoE connector ------------------------------------------------------------------------------

def _moe(*overrides, name="moe"):
    """A tiny model of ``name``; an override ``"fusion={...}"`` replaces the strategy spec (the
    helper's own ``fusion=<name>`` override cannot be extended by a second one)."""
    spec = [o.split("=", 1)[1] for o in overrides if o.startswith("fusion=")]
    return tiny_model(spec[-1] if spec else name, *[o for o in overrides if not o.startswith("fusion=")])


def test_upcycle_copies_the_trained_dense_mlp_into_every_expert():
    model = _moe("fusion={name: moe, num_experts: 4, top_k: 2}")
    moe = model.fusion.projector
    model.set_stage("dense")
    assert set(model.trainable_parameter_names()) == {f"fusion.projector.dense.{n}" for n, _ in moe.dense.named_parameters()}
    _perturb(moe.dense.parameters(), scale=0.3)  # "training" of the dense connector
    features = torch.randn(2, model.vision.num_tokens, model.vision.feature_dim)
    with torch.no_grad():
        dense_out = moe.dense(features)
        assert torch.equal(model.fusion.image_embeddings(features), dense_out)  # dense stage: the dense MLP
    assert model.fusion.aux_losses() == {}
    model.set_stage("unfreeze")
    model.set_stage("upcycle")
    for expert in moe.experts:
        for (n, a), (_, b) in zip(moe.dense.named_parameters(), expert.named_parameters()):
            assert torch.equal(a, b), n
    with torch.no_grad():
        _, _, top_w, top_i = moe.route(features.reshape(-1, features.shape[-1]))
        sparse_out = model.fusion.image_embeddings(features)
    assert top_i.shape[-1] == 2
    assert torch.allclose(top_w.sum(-1), torch.ones(top_w.shape[0]), atol=1e-6)
    assert (sparse_out - dense_out).abs().max().item() <= 1e-5
    trainable = set(model.trainable_parameter_names())
    assert trainable and all(".experts." in n or ".router." in n for n in trainable)
    # upcycling happens once: trained experts are not overwritten by another begin_stage
    _perturb(moe.experts[0].parameters(), scale=0.3)
    moved = [p.clone() for p in moe.experts[0].parameters()]
    model.set_stage("upcycle")
    assert all(torch.equal(a, b) for a, b in zip(moved, moe.experts[0].parameters()))


def test_moe_scratch_experts_are_random_not_dense_copies():
    model = _moe(name="moe_scratch")
    moe = model.fusion.projector
    assert moe.dense is None and model.fusion.stage_names == ("main",)
    weights = [e[0].weight for e in moe.experts]
    assert len(weights) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(weights[i], weights[j])
    upcycled = _moe().fusion.projector
    assert not torch.allclose(weights[0], upcycled.experts[0][0].weight)
    assert torch.equal(upcycled.experts[0][0].weight, upcycled.dense[0].weight)


@pytest.mark.parametrize("name", ["moe", "moe_scratch"])
def test_moe_aux_losses_present_and_finite(name):
    model = _moe(name=name)
    batch, _ = image_batch(model)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert set(out.aux_losses) == {"load_balance", "router_z"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in out.aux_losses.values())
    assert torch.allclose(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    ids, mask = text_batch(model)
    model(ids, mask, None, ids)  # text-only: no routing, no stale aux losses
    assert model.fusion.aux_losses() == {}


def test_uniform_router_gives_load_balance_coef_times_one():
    model = _moe("fusion={name: moe, balance_coef: 0.1, z_coef: 0.01}")
    with torch.no_grad():
        model.fusion.projector.router.weight.zero_()
    model.fusion.image_embeddings(torch.randn(2, model.vision.num_tokens, model.vision.feature_dim))
    aux = model.fusion.aux_losses()
    assert aux["load_balance"].item() == pytest.approx(0.1 * 1.0, abs=1e-6)
    assert aux["router_z"].item() == pytest.approx(0.01 * math.log(4) ** 2, abs=1e-6)


def test_gather_per_expert_equals_a_dense_per_token_reference():
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 12)) for _ in range(5)]
    moe = UpcycledMoE(None, experts, 8, top_k=2)
    x = torch.randn(3, 7, 8)
    out = moe(x)
    flat = x.reshape(-1, 8)
    _, _, top_w, top_i = moe.route(flat)
    reference = torch.stack([sum(top_w[n, k] * experts[int(top_i[n, k])](flat[n]) for k in range(2))
                             for n in range(flat.shape[0])]).reshape(3, 7, 12)
    assert (out - reference).abs().max().item() <= 1e-6
    out.sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_vision_moe_needs_transformer_mlp_blocks():
    with pytest.raises(FusionBenchError, match="MLP blocks"):
        _moe("fusion={name: moe, vision_moe: true}", "vision.source=tiny_cnn")


def test_vision_moe_upcycles_the_vision_mlp_blocks():
    model = _moe("fusion={name: moe, vision_moe: true}", "vision.source=tiny_vit")
    blocks = [(n, m) for n, m in model.vision.named_modules() if isinstance(m, UpcycledMoE)]
    assert len(blocks) == tiny_cfg().vision.depth
    for _, m in blocks:  # main stage: experts are copies of the pretrained encoder's MLPs
        for e in m.experts:
            assert all(torch.equal(a, b) for a, b in zip(m.dense.parameters(), e.parameters()))
    trainable = set(model.trainable_parameter_names())
    assert any(n.startswith("vision.") and ".experts." in n for n in trainable)
    assert not any(n.startswith("vision.") and ".dense." in n for n in trainable)
    batch, _ = image_batch(model)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert {"load_balance", "router_z", "vision_load_balance", "vision_router_z"} <= set(out.aux_losses)
    out.loss.backward()
    assert all(dict(model.named_parameters())[n].grad is not None for n in trainable)
    model.set_stage("unfreeze")
    trainable = set(model.trainable_parameter_names())
    assert {n for n in trainable if n.startswith("vision.")} == {
        f"{n}.dense.{p}" for n, m in [(f"vision.{n}", m) for n, m in blocks] for p, _ in m.dense.named_parameters()}
    assert all(not m.sparse for _, m in blocks)


def test_init_from_a_dense_mlp_checkpoint(tmp_path):
    mlp = tiny_model("mlp")
    _perturb(mlp.fusion.projector.parameters(), scale=0.3)
    dense = {k: v.clone() for k, v in mlp.fusion.projector.state_dict().items()}
    torch.save(mlp.trainable_state_dict(), tmp_path / "mlp.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in mlp.trainable_state_dict().items()},
                "fusionbench_stage": "main"}, tmp_path / "last.ckpt")
    for f in ("mlp.pt", "last.ckpt"):
        model = _moe(f"fusion={{name: moe, init_from: '{tmp_path / f}'}}")
        moe = model.fusion.projector
        for k, v in dense.items():
            assert torch.equal(moe.dense.state_dict()[k], v)
            assert all(torch.equal(e.state_dict()[k], v) for e in moe.experts)
    with pytest.raises(FusionBenchError, match="no such checkpoint"):
        _moe(f"fusion={{name: moe, init_from: '{tmp_path / 'missing.pt'}'}}")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(FusionBenchError, match="no dense MLP connector"):
        _moe(f"fusion={{name: moe, init_from: '{tmp_path / 'other.pt'}'}}")


def test_moe_bad_top_k_is_a_clear_error():
    with pytest.raises(FusionBenchError, match="top_k"):
        _moe("fusion={name: moe, num_experts: 2, top_k: 3}")


# -- full finetune ------------------------------------------------------------------------------

def test_full_finetune_trains_every_lm_parameter_and_drifts():
    model = tiny_model("full_finetune")
    lm_names = {n for n, _ in model.named_parameters() if n.startswith("lm.")}
    trainable = set(model.trainable_parameter_names())
    assert lm_names <= trainable and trainable - lm_names == {n for n in trainable if n.startswith("fusion.")}
    assert "lm.lm_head.weight" not in trainable and "lm.model.embed_tokens.weight" in trainable  # tied: once
    assert not any(n.startswith("vision.") for n in trainable)
    ids, mask = text_batch(model)
    with torch.no_grad():
        before = model.logits(ids, mask)
    batch, _ = image_batch(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model.logits(ids, mask)
    assert (after - before).abs().max().item() > 1e-4
    with pytest.raises(FusionBenchError, match="cannot be recovered"):
        with model.fusion.base_lm(model):
            pass


def test_projections_sharing_an_input_share_one_gather_and_gradients_match_reference():
    """q/k/v (or gate/up) read the same tensor: one gather for all of them, and the gradients of
    the input and of every expert / base weight equal those of the dense reference."""
    torch.manual_seed(0)
    routing = TokenRouting()
    layers = [ImageRowExpert(torch.nn.Linear(16, d), routing) for d in (24, 8, 8)]
    for layer in layers:
        _perturb(layer.expert.parameters(), scale=0.5)
        layer.base_layer.requires_grad_(True)
    mask = torch.rand(3, 10) < 0.4
    x0 = torch.randn(3, 10, 16)

    def loss_of(forward):
        x = x0.clone().requires_grad_(True)
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        loss = sum((forward(layer, x) * torch.linspace(-1, 1, layer.out_features)).pow(2).sum() for layer in layers)
        loss.backward()
        return x.grad, [p.grad.clone() for layer in layers for p in layer.parameters()]

    gathers = []
    original = routing.sorted_rows
    routing.sorted_rows = lambda x, order: (gathers.append(x) if routing._sorted is None or routing._sorted[0] is not x
                                            else None) or original(x, order)
    with routing.set(image_mask=mask):
        gx, gp = loss_of(lambda layer, x: layer(x))
    assert len(gathers) == 1
    rx, rp = loss_of(lambda layer, x: torch.where(mask.unsqueeze(-1), layer.expert(x), layer.base_layer(x)))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    assert len(gp) == len(rp) == 12
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_visual_expert_last_layer_keeps_only_key_value_experts_and_the_same_numbers(monkeypatch):
    """The last layer's q / o / MLP experts never reached the loss: without them the loss, the
    gradients of everything else and the trained logits are exactly what they were."""
    import fusionbench.fusion.visual_expert as ve
    from fusionbench.model import IMAGE_TOKEN_ID
    from tests.helpers import image_batch, tiny_model, train_a_few_steps

    def trained(model):
        torch.manual_seed(0)
        train_a_few_steps(model, steps=2, lr=1e-2)
        batch, _ = image_batch(model, n=3)
        with torch.no_grad():
            loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss
            text = batch["input_ids"] != IMAGE_TOKEN_ID
            return loss, model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[text]

    pruned = tiny_model("visual_expert")
    last = pruned.lm.config.num_hidden_layers - 1
    names = [n for n in pruned.trainable_parameter_names() if f"layers.{last}." in n]
    assert names and all(any(k in n for k in ("k_proj", "v_proj")) for n in names), names
    monkeypatch.setattr(ve, "_feeds_keys_or_values", lambda name: True)   # the old, unpruned layout
    full = tiny_model("visual_expert")
    assert len(full.trainable_parameter_names()) == len(pruned.trainable_parameter_names()) + 5
    (loss_a, logits_a), (loss_b, logits_b) = trained(pruned), trained(full)
    assert torch.equal(loss_a, loss_b) and torch.equal(logits_a, logits_b)  # every text position
