"""The contract every registered fusion strategy gets for free (tiny tier, CPU, fp32)."""
import pytest
import torch

from fusionbench.errors import FusionBenchError
from fusionbench.fusion import FUSIONS
from fusionbench.model import IMAGE_TOKEN_ID
from tests.helpers import image_batch, text_batch, tiny_cfg, tiny_model

STRATEGIES = FUSIONS.names()


@pytest.fixture(params=STRATEGIES)
def model(request):
    return tiny_model(request.param)


def _forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])


def test_forward_backward_reaches_every_trainable_parameter(model):
    batch, _ = image_batch(model)
    out = _forward(model, batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a strategy must train something"
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"trainable but untouched by the loss: {no_grad[:5]}"


def test_every_trainable_tensor_gets_a_nonzero_gradient(model):
    """Not just "not None": after a few steps (zero-initialised gates / LoRA B open up), every
    trainable tensor receives a non-zero gradient on a real batch: nothing that trains and is
    counted can never reach the loss (e.g. visual-expert copies of the last layer's q / o / MLP)."""
    from tests.helpers import train_a_few_steps

    train_a_few_steps(model, steps=2, lr=1e-2)
    model.train()
    batch, _ = image_batch(model, n=4)
    model.zero_grad()
    _forward(model, batch).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"trainable tensors with an all-zero gradient: {dead[:6]} ({len(dead)} in all)"


def test_declared_trainable_set_is_exactly_what_requires_grad(model):
    declared = model.fusion.trainable(model, model.stage)
    assert set(model.trainable_parameter_names()) == declared


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(model):
    torch.manual_seed(0)
    batch, _ = image_batch(model, n=4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = _forward(model, batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses  # random frozen LM: small but real drop


def _base_logits(model, ids, mask):
    """Logits of a freshly built base LM (same config and seed): injection strategies modify
    ``model.lm`` in place, so it cannot serve as its own reference."""
    from fusionbench.assets.lm import load_lm

    lm, _ = load_lm(tiny_cfg().lm, seed=tiny_cfg().seed)
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits


def _train_a_little(model):
    batch, _ = image_batch(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        _forward(model, batch).loss.backward()
        opt.step()
    model.eval()


def test_untrained_text_only_logits_identical_to_base_lm(model):
    """Every strategy, untrained (zero gates, LoRA B = 0, copies of the LM's own weights), gives
    the base LM's logits on text-only input."""
    ids, mask = text_batch(model)
    with torch.no_grad():
        ours = model.logits(ids, mask)
    assert (ours - _base_logits(model, ids, mask)).abs().max().item() <= 1e-6


def test_text_only_invariance_survives_training(model):
    """Text-invariant strategies keep the base LM's text path after training; the others recover
    it through ``base_lm()`` where they can (LoRA: ``disable_adapter()``), and really drift
    without it (so the forgetting they are measured for is not vacuous)."""
    ids, mask = text_batch(model)
    base = _base_logits(model, ids, mask)
    _train_a_little(model)
    with torch.no_grad():
        after = model.logits(ids, mask)
    if model.fusion.text_invariant:
        assert (after - base).abs().max().item() <= 1e-6
        return
    assert (after - base).abs().max().item() > 1e-4, "a text-path-changing strategy did not change the text path"
    try:
        ctx = model.fusion.base_lm(model)
        ctx.__enter__()
    except FusionBenchError:
        return  # weights changed in place (full finetune): nothing to recover, drift shown above
    try:
        with torch.no_grad():
            recovered = model.logits(ids, mask)
    finally:
        ctx.__exit__(None, None, None)
    assert (recovered - base).abs().max().item() <= 1e-6


def test_trainable_checkpoint_roundtrip_gives_identical_outputs(model, tmp_path):
    batch, _ = image_batch(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = model.trainable_state_dict()
    torch.save(state, tmp_path / "trainable.pt")
    fresh = tiny_model(model.fusion.registry_name)
    fresh.load_trainable_state_dict(torch.load(tmp_path / "trainable.pt"))
    model.eval(), fresh.eval()
    with torch.no_grad():
        a = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = fresh.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.equal(a, b)
    assert set(state) == set(model.trainable_parameter_names())


def test_generate_with_images_and_text_only(model):
    from fusionbench.data.format import Collator

    _, rows = image_batch(model)
    model.eval()
    prompts = Collator(model.tokenizer, model.vision.preprocess, model.num_image_tokens, 512, with_answer=False)(rows)
    out = model.generate(prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"], max_new_tokens=3)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3
    text = Collator(model.tokenizer, None, 0, 512, with_answer=False, with_image=False)(rows)
    out = model.generate(text["input_ids"], text["attention_mask"], None, max_new_tokens=3)
    assert out.shape[0] == 2


def test_wrong_image_shape_is_a_clear_error(model):
    batch, _ = image_batch(model)
    with pytest.raises(FusionBenchError, match=r"pixel_values must have shape \[batch, 3, 32, 32\]"):
        model(batch["input_ids"], batch["attention_mask"], torch.zeros(2, 3, 17, 17), batch["labels"])


def test_image_embeddings_of_the_wrong_shape_are_one_clear_error(model, monkeypatch):
    """A strategy whose image_embeddings returns more tokens than its num_image_tokens (e.g. it forgot
    to pool) must not have the extra tokens spill into the next item's placeholders, nor fewer
    tokens fail deep inside torch: one error naming the shapes."""
    if not model.num_image_tokens:
        return
    batch, _ = image_batch(model)
    real = model.fusion.image_embeddings
    for change in (lambda e: torch.cat([e, e[:, :1]], 1), lambda e: e[:, 1:], lambda e: e[..., :-1]):
        monkeypatch.setattr(model.fusion, "image_embeddings", lambda f, change=change: change(real(f)))
        with pytest.raises(FusionBenchError, match=r"image_embeddings returned shape .* expected \(2, "):
            model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])


def test_image_placeholders_must_match_the_strategy(model):
    batch, _ = image_batch(model)
    ids = batch["input_ids"].clone()
    if model.num_image_tokens:
        ids[0, (ids[0] == IMAGE_TOKEN_ID).nonzero()[0]] = 5  # one placeholder short
        with pytest.raises(FusionBenchError, match="image placeholders"):
            model(ids, batch["attention_mask"], batch["pixel_values"], batch["labels"])
    with pytest.raises(FusionBenchError, match="text-only input must not contain image placeholders"):
        bad = batch["input_ids"].clone()
        bad[0, 0] = IMAGE_TOKEN_ID
        model(bad, batch["attention_mask"], None, batch["labels"])


@pytest.mark.parametrize("name", FUSIONS.names())
def test_every_strategy_states_its_text_path_declarations_itself(name):
    """text_invariant / frozen_text_prefix: one instance-level answer from the validated options;
    each registered class states its ``TEXT_PATH`` in its own body, so subclassing a concrete
    strategy never silently inherits it."""
    cls = FUSIONS.get(name)
    assert vars(cls).get("TEXT_PATH") in ("frozen", "conditioned", "trained"), f"{name} does not state TEXT_PATH"
    opts = cls.default_options()
    assert isinstance(cls.text_invariant_for(opts), bool) and isinstance(cls.frozen_text_prefix_for(opts), bool)
    assert not cls.frozen_text_prefix_for(opts) or cls.text_invariant_for(opts)


def test_prefix_with_a_task_prefix_is_not_text_invariant_and_the_report_reads_the_row():
    from fusionbench.fusion.base import fusion_options
    from fusionbench.report import _frozen_text

    prefix = FUSIONS.get("prefix")
    assert prefix.text_invariant_for(fusion_options({"name": "prefix"}))
    assert not prefix.text_invariant_for(fusion_options({"name": "prefix", "task_prefix_tokens": 4}))
    model = tiny_model("{name: prefix, prefix_length: 4, task_prefix_tokens: 4}")
    assert model.fusion.text_invariant is False
    # the report: the recorded answer wins; rows without one are decided from their options
    assert _frozen_text({"name": "prefix", "task_prefix_tokens": 4}) is False
    assert _frozen_text({"name": "prefix", "task_prefix_tokens": 0}) is True
    assert _frozen_text({"name": "mlp"}, recorded=False) is False
    assert _frozen_text({"name": "flamingo", "text_path_drift": True}) is False


def text_rows_check(model) -> list[str]:
    """With an image in the batch: (1) every injected layer that touches image rows only gives, at
    every non-image position, exactly what its ``base_layer`` gives on those rows (hooks); (2) where
    the strategy promises a frozen text prefix, the LM's output at the text before the first image
    token is exactly a fresh base LM's on the same inputs. Returns what broke (empty: nothing)."""
    from fusionbench.assets.lm import load_lm
    from fusionbench.fusion.inject import injected

    batch, _ = image_batch(model, n=3)
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    broken, hooks, seen = [], [], {}

    def check(name):
        def hook(module, args, output):
            x = args[0]
            if x.dim() != 3 or x.shape[:2] != image.shape:
                return
            with torch.no_grad():
                base = module.base_layer(x[~image])
            if not torch.equal(output[~image], base):
                broken.append(f"{name}: text rows differ from base_layer")
        return hook

    def capture(module, args, kwargs, output):
        seen.setdefault("call", (args, dict(kwargs), output))

    for name, layer in injected(model):
        if layer.rows == "image":
            hooks.append(layer.register_forward_hook(check(name)))
    hooks.append(model.lm.get_decoder().register_forward_hook(capture, with_kwargs=True))
    model.eval()
    try:
        with torch.no_grad():
            model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    finally:
        for h in hooks:
            h.remove()
    if model.fusion.frozen_text_prefix:
        first = int(image.float().argmax(1).min())  # the earliest image token in the batch
        args, kwargs, output = seen["call"]
        cfg = tiny_cfg(f"lm.tiny.arch={model.lm.config.model_type}")
        base, _ = load_lm(cfg.lm, seed=cfg.seed)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        with torch.no_grad():
            want = base.get_decoder()(*args, use_cache=False, **kwargs).last_hidden_state
        if not torch.equal(output.last_hidden_state[:, :first], want[:, :first]):
            broken.append("text before the first image token differs from the base LM")
    return broken


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("name", [n for n in STRATEGIES if FUSIONS.get(n).text_invariant_for(FUSIONS.get(n).default_options())])
def test_text_rows_run_the_frozen_weights(name, arch):
    """Every frozen-text strategy, on every tiny LM family, after training (so experts differ)."""
    from tests.helpers import train_a_few_steps

    model = tiny_model(name, f"lm.tiny.arch={arch}")
    train_a_few_steps(model, steps=2, lr=1e-2)
    assert text_rows_check(model) == []


def test_text_rows_check_catches_a_strategy_that_routes_text_through_its_experts(monkeypatch):
    """The deliberately broken variant: text rows go through the trainable copies whenever an
    image is present. The text-only contract cannot see it; this check does."""
    from fusionbench.fusion.inject import ImageRowExpert
    from tests.helpers import train_a_few_steps

    model = tiny_model("visual_expert")
    train_a_few_steps(model, steps=2, lr=1e-2)

    def leaky(self, x):
        return self.expert(x) if self.conditioning.get("image_mask") is not None else self.base_layer(x)

    monkeypatch.setattr(ImageRowExpert, "forward", leaky)
    assert any("text rows differ" in b for b in text_rows_check(model))
