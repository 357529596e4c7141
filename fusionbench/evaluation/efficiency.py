"""What a strategy costs: parameters and FLOPs, counted on one real batch.

:func:`efficiency` runs the model on one training batch (``input_ids``, ``attention_mask``,
``pixel_values``, ``labels``, as the training collator makes it) under
:class:`torch.utils.flop_counter.FlopCounterMode` and returns ``eff/*`` floats. FLOPs are torch's
count of matrix products (``mm``/``addmm``/``bmm``), convolutions and attention kernels, at 2 FLOPs
per multiply-add; elementwise ops, norms, softmax, embeddings lookups and the optimizer are not
counted. Attention is counted over the full ``S_q x S_k`` score matrix (torch's formula ignores the
causal mask and padding, on every device). torch's table has no entry for the CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, what ``sdpa`` attention
runs on CPU); :data:`EXTRA_FLOP_FORMULAS` adds it with torch's own SDPA formula, so CPU and GPU
counts agree.

Definitions (``B`` sequences of padded length ``T``; ``n`` image placeholder positions per sequence,
``model.num_image_tokens``, 0 for ``flamingo`` / ``prefix``, which condition through cross-attention
or key/value prefixes instead of tokens):

**The two forwards.** *Image forward*: ``model(input_ids, attention_mask, pixel_values, labels)``,
the training forward (vision encoder, connector, LM, output layer on the labelled positions only).
*Text forward*: the same prompts with the ``n`` placeholder positions of every row removed (the
text tokens, padding and labels are otherwise identical, so every row is ``T - n`` long) and
``pixel_values=None``: the strategy's text-only mode (:func:`text_only_batch`).

``eff/flops_fwd``, ``eff/flops_fwd_text``
    FLOPs of the image / text forward of the whole batch.
``eff/flops_fwd_vision``, ``eff/flops_fwd_lm``, ``eff/flops_fwd_connector``
    the image forward split by where ops run: inside ``model.vision``; inside ``model.lm``'s modules
    (decoder and output layer, including modules a strategy injected into the LM: experts,
    gated cross-attention, LoRA); everything else (projector, Q-Former, resampler, prefix encoder).
    ``eff/flops_fwd_text_lm``: the LM part of the text forward.
``eff/flops_train_step``
    FLOPs of one training step without the optimizer: the image forward plus
    ``loss.backward()`` (input gradients through every differentiable path to a trainable
    parameter, plus weight gradients of the trainable parameters). Equals ``eff/flops_fwd`` when
    nothing the loss depends on trains. ``eff/flops_train_step_over_fwd`` is the ratio.

**Per token.** A *token* is a sequence position of the padded batch (padding included: it is
computed like any other position; ``eff/padding_fraction`` says how much of the batch it is).
``eff/positions = B * T``, ``eff/text_positions = B * (T - n)``.

``eff/flops_fwd_per_token`` = ``flops_fwd / positions``; ``eff/flops_fwd_lm_per_token`` =
``flops_fwd_lm / positions``; ``eff/flops_train_step_per_token`` = ``flops_train_step / positions``.
``eff/flops_fwd_per_text_token`` = ``flops_fwd_text / text_positions``: the cost of a text token
when no image is present (for a text-invariant strategy, the base LM's).

**Per image.** The image's cost is the difference of the two forwards,
``Δ = flops_fwd - flops_fwd_text``: the vision encoder, the connector, the LM's compute at the
image positions, and the attention between image positions and all positions (with torch's
full-matrix attention formula, ``T^2 - (T - n)^2`` more score entries per head and layer), or, for
``flamingo`` and ``prefix``, the resampler, the gated cross-attention to the latents / the prefix
encoder and the attention over prefix keys and values; i.e. everything the image adds to the same
text. ``eff/flops_fwd_per_image`` = ``Δ / B`` (every
strategy). ``eff/flops_fwd_per_image_token`` = ``Δ / (B * n)``: present only where ``n > 0``
(absent for ``flamingo`` / ``prefix``, whose image has no tokens; use the per-image key).
``eff/flops_vision_per_image`` = ``flops_fwd_vision / B``, the encoder's share.

Also ``eff/params_total`` / ``eff/params_trainable`` (:meth:`VisionLanguageModel.param_counts`),
``eff/batch_size``, ``eff/image_tokens_per_image`` (``n``) and ``eff/tokens`` (attention-mask
positions of the image batch, image placeholders included).

Counting leaves the model as it was: no optimizer step; the forwards run in eval mode and the
training step in train mode (as the trainer runs it), then the previous mode is restored;
existing ``.grad`` tensors are set aside and put back (the same tensor objects, untouched); buffers
are restored to their values; the global RNG state is restored. Per-forward state a strategy keeps
(e.g. the MoE auxiliary losses of "the last forward") is that of the counting forward afterwards.
On the embedded default (SmolLM2-135M + EfficientNet-Lite0) one batch of 8 costs about two
forwards and one backward: a few seconds on CPU.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from fusionbench.errors import FusionBenchError
from fusionbench.model import IGNORE_INDEX, IMAGE_TOKEN_ID, VisionLanguageModel

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: attention kernels torch's FLOP table lacks (same formulas as its GPU SDPA kernels)
EXTRA_FLOP_FORMULAS: dict[Any, Any] = {
    op: fn for op, fn in (
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), _cpu_sdpa_flop),
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), _cpu_sdpa_backward_flop),
    ) if op is not None and op not in flop_counter.flop_registry
}


def flop_counter_mode() -> FlopCounterMode:
    """A quiet :class:`FlopCounterMode` that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def module_flops(counter: FlopCounterMode, root: torch.nn.Module, child: str) -> int:
    """FLOPs counted inside ``root.<child>`` (any of its submodules; ops counted once)."""
    prefix = f"{type(root).__name__}.{child}"
    keys = [k for k in counter.get_flop_counts() if k == prefix or k.startswith(prefix + ".")]
    top = [k for k in keys if not any(k != o and k.startswith(o + ".") for o in keys)]
    counts = counter.get_flop_counts()
    return sum(sum(counts[k].values()) for k in top)


def text_only_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The same prompts without image placeholders and without images: every row loses its
    ``IMAGE_TOKEN_ID`` positions (the same number in each row), ``pixel_values`` is None."""
    ids = batch["input_ids"]
    keep = ids != IMAGE_TOKEN_ID
    per_row = keep.sum(1)
    if not bool((per_row == per_row[0]).all()):
        raise FusionBenchError("rows have different numbers of image placeholders")
    b, t = ids.shape[0], int(per_row[0])
    out = {k: batch[k][keep].view(b, t) for k in ("input_ids", "attention_mask", "labels") if batch.get(k) is not None}
    out["pixel_values"] = None
    return out


def _labels(batch: dict[str, Any]) -> torch.Tensor:
    """The batch's labels; without any, every attended text position is a target."""
    if batch.get("labels") is not None:
        return batch["labels"]
    ids = batch["input_ids"]
    return ids.masked_fill((batch["attention_mask"] == 0) | (ids == IMAGE_TOKEN_ID), IGNORE_INDEX)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restores mode, ``.grad`` tensors, buffer values and the global RNG state on exit; the
    vision feature cache and the prompt-prefix KV cache are off inside."""
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    # FLOPs are of the computation itself: the vision encoder runs (no feature cache)
    # and so does the whole prompt (no prefix KV cache)
    switches = {name: getattr(model, name) for name in ("feature_cache", "cache_text_prefix") if hasattr(model, name)}
    with torch.random.fork_rng(devices=devices):
        try:
            for p in params:
                p.grad = None
            for name in switches:
                setattr(model, name, False)
            yield
        finally:
            for name, value in switches.items():
                setattr(model, name, value)
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes.items():
                m.training = mode


def efficiency(model: VisionLanguageModel, batch: dict[str, Any]) -> dict[str, float]:
    """Parameters and FLOPs of ``model`` on ``batch`` (see the module docstring for every key)."""
    if batch.get("pixel_values") is None:
        raise FusionBenchError("efficiency() needs a batch with images (pixel_values)")
    device = next(model.parameters()).device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["labels"] = _labels(batch)
    text = text_only_batch(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    n = model.num_image_tokens
    n_found = int((ids == IMAGE_TOKEN_ID).sum())
    if n_found != b * n:
        raise FusionBenchError(f"batch has {n_found} image placeholders, strategy "
                               f"{model.fusion.registry_name!r} needs {n} per sequence ({b * n})")

    def run(inputs):
        return model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["labels"])

    out: dict[str, float] = {f"eff/{k}": float(v) for k, v in model.param_counts().items()}
    with preserved_state(model):
        # grad mode on throughout, also for the forwards (their graphs are dropped at once): torch's
        # module tracker fails on a parameter passed as a module input under no_grad
        model.eval()
        with torch.enable_grad():
            with flop_counter_mode() as fwd:
                run(batch)
            with flop_counter_mode() as fwd_text:
                run(text)
        model.train()
        with torch.enable_grad(), flop_counter_mode() as train:
            loss = run(batch).loss
            if loss.requires_grad:
                loss.backward()
            del loss

    positions, text_positions = b * t, b * (t - n)
    flops = fwd.get_total_flops()
    flops_text = fwd_text.get_total_flops()
    vision = module_flops(fwd, model, "vision")
    lm = module_flops(fwd, model, "lm")
    image = flops - flops_text
    out.update({
        "eff/batch_size": float(b),
        "eff/image_tokens_per_image": float(n),
        "eff/positions": float(positions),
        "eff/text_positions": float(text_positions),
        "eff/tokens": float(mask.sum()),
        "eff/padding_fraction": float(1 - mask.sum().item() / positions),
        "eff/flops_fwd": float(flops),
        "eff/flops_fwd_vision": float(vision),
        "eff/flops_fwd_lm": float(lm),
        "eff/flops_fwd_connector": float(flops - vision - lm),
        "eff/flops_fwd_text": float(flops_text),
        "eff/flops_fwd_text_lm": float(module_flops(fwd_text, model, "lm")),
        "eff/flops_train_step": float(train.get_total_flops()),
        "eff/flops_train_step_over_fwd": train.get_total_flops() / flops if flops else float("nan"),
        "eff/flops_fwd_per_token": flops / positions,
        "eff/flops_fwd_lm_per_token": lm / positions,
        "eff/flops_train_step_per_token": train.get_total_flops() / positions,
        "eff/flops_fwd_per_text_token": flops_text / text_positions,
        "eff/flops_fwd_per_image": image / b,
        "eff/flops_vision_per_image": vision / b,
    })
    if n > 0:
        out["eff/flops_fwd_per_image_token"] = image / (b * n)
    return out


def train_step_flops(model: VisionLanguageModel, batch: dict[str, Any]) -> int:
    """FLOPs of one training step (forward + backward, optimiser excluded) of ``model`` on ``batch``,
    in the model's current stage; leaves parameters, gradients, buffers and RNG as they were."""
    device = next(model.parameters()).device
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with preserved_state(model):
        model.train()
        with torch.enable_grad(), flop_counter_mode() as counter:
            loss = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), _labels(batch)).loss
            if loss.requires_grad:
                loss.backward()
            del loss
    return int(counter.get_total_flops())
