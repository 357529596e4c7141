"""CogVLM-style deep fusion (Wang et al., 2023, "CogVLM: Visual Expert for Pretrained Language
Models"): image tokens enter the LM through an MLP projector, and in each selected decoder layer the
attention QKV, attention output and MLP weights get a trainable *visual expert* copy, initialised
from the LM's own weights, that only image tokens use. Text tokens keep the frozen original weights,
so text-only input is exactly the base LM and per-token FLOPs are unchanged (the expert replaces a
matmul for image rows, it never adds one). In the LM's last layer only the key / value projections
get experts: an image row's output there reaches nothing (its logits are never scored), so copies of
q / o / the MLP would count as trainable without ever receiving a gradient."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import decoder_layers, layer_indices
from fusionbench.fusion.base import register
from fusionbench.fusion.inject import Conditioning, InjectedLayer, inject_layers, injected_parameter_names
from fusionbench.fusion.projector import MLPOptions, MLPProjector


#: projection names (last path component) whose output becomes attention keys or values: Llama /
#: Qwen2 / Gemma ``k_proj`` ``v_proj``, GPT-2's fused ``c_attn``, NeoX's ``query_key_value``, ...
_KV_NAMES = ("k_proj", "v_proj", "key", "value", "c_attn", "qkv", "qkv_proj", "query_key_value", "Wqkv", "kv_proj")


def _feeds_keys_or_values(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in _KV_NAMES


def _projection_types() -> tuple[type, ...]:
    """Linear layers as HF decoders build them: ``nn.Linear`` and GPT-2's transposed ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


class TokenRouting(Conditioning):
    """The conditioning shared by every :class:`VisualExpertLinear` of one model: the image mask
    ``[B, T]`` of the current LM call (``image_mask``; None: no image, every token is text), with
    the row plan derived from it cached for the call."""

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[int, tuple[torch.Tensor, torch.Tensor, int] | None] = {}
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    def _changed(self) -> None:
        self._plans, self._sorted = {}, None

    @property
    def image_mask(self) -> torch.Tensor | None:
        return self.get("image_mask")

    @image_mask.setter
    def image_mask(self, mask: torch.Tensor | None) -> None:  # outside a ``set`` block (tests)
        self._state["image_mask"] = mask
        self._changed()

    def plan(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``(order, inverse, n_text)`` for ``x [B, T, D]``: flat row indices with text rows first
        and image rows after, the permutation back, and how many text rows; None when every row
        is text. Positions beyond the mask (cached generation: the new tokens) are text; a step
        shorter than the mask (a decode step after the prefill) is all text. Computed once per
        sequence length and shared by every projection of the LM call."""
        mask = self.image_mask
        if mask is None:
            return None
        if x.dim() != 3 or x.shape[0] != mask.shape[0]:
            raise FusionBenchError(f"visual_expert: input of shape {list(x.shape)} does not match the image "
                                   f"mask of shape {list(mask.shape)} (expected [batch, seq, features])")
        t = x.shape[1]
        if t not in self._plans:
            self._plans[t] = self._split(mask, t)
        return self._plans[t]

    def sorted_rows(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``x``'s rows in ``order`` (text rows, then image rows), gathered once per input tensor:
        projections that read the same input (q/k/v, gate/up) share one gather, and its gradient
        is scattered back once."""
        if self._sorted is None or self._sorted[0] is not x:
            self._sorted = (x, x.reshape(-1, x.shape[-1]).index_select(0, order))
        return self._sorted[1]

    @staticmethod
    def _split(mask: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        tm = mask.shape[1]
        if t < tm:
            return None
        if t > tm:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], t - tm)], dim=1)
        flat = mask.reshape(-1).bool()
        image_rows = flat.nonzero().squeeze(1)
        if not image_rows.numel():
            return None
        text_rows = (~flat).nonzero().squeeze(1)
        order = torch.cat([text_rows, image_rows])
        return order, torch.argsort(order), text_rows.numel()


class VisualExpertLinear(InjectedLayer):
    """An injected projection: ``base_layer`` (the LM's frozen original) for text rows, ``expert``
    (a trainable copy) for image rows. Each weight runs only on its own rows: the rows are gathered
    text-first (once per input, shared by projections of the same input), each part goes through
    its weight, one gather puts them back in place. Without an image mask it *is* ``base_layer``."""

    rows = "image"

    def __init__(self, base_layer: nn.Module, routing: TokenRouting):
        super().__init__(base_layer, routing)
        self.expert = copy.deepcopy(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing: TokenRouting = self.conditioning
        plan = routing.plan(x)
        if plan is None:
            return self.base_layer(x)
        order, inverse, n_text = plan
        b, t, _ = x.shape
        rows = routing.sorted_rows(x, order)
        text_out = self.base_layer(rows[:n_text])
        image_out = self.expert(rows[n_text:])
        dtype = torch.promote_types(text_out.dtype, image_out.dtype)
        out = torch.cat([text_out.to(dtype), image_out.to(dtype)]).index_select(0, inverse)
        return out.reshape(b, t, -1)


@dataclass
class VisualExpertOptions(MLPOptions):
    #: decoder layers that get visual experts: all, top_half, bottom_half, every_N or a list of indices
    layers: Any = "all"


@register("visual_expert")
class VisualExpert(MLPProjector):
    """CogVLM visual expert: MLP projector + per-layer trainable copies of the attention QKV /
    output and MLP projections, applied only at image-token positions (text tokens: frozen LM)."""

    Options = VisualExpertOptions
    TEXT_INVARIANT = True       # text rows run the frozen weights
    FROZEN_TEXT_PREFIX = True   # and the text before the image has no image row to route

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self.routing = TokenRouting()

    def _selected(self, vlm) -> list[tuple[str, nn.Module]]:
        path, layers = decoder_layers(vlm.lm)
        idx = layer_indices(self.options.layers, len(layers), "fusion.layers")
        return [(f"{path}.{i}", layers[i]) for i in idx]

    def _is_last(self, vlm, layer: nn.Module) -> bool:
        _, layers = decoder_layers(vlm.lm)
        return layer is layers[len(layers) - 1]

    def validate(self, vlm) -> None:
        types = _projection_types()
        for name, layer in self._selected(vlm):
            if not any(isinstance(m, types) for m in layer.modules()):
                raise FusionBenchError(f"visual_expert: decoder layer {name} has no Linear / Conv1D projections")

    def inject(self, vlm) -> None:
        types = _projection_types()
        for _, layer in self._selected(vlm):
            # in the LM's last layer an image row's output feeds nothing (its logits are never
            # scored); only its keys / values reach the loss, through the text rows after it
            last = self._is_last(vlm, layer)
            inject_layers(layer, lambda n, m: isinstance(m, types) and (not last or _feeds_keys_or_values(n)),
                          lambda n, m: VisualExpertLinear(m, self.routing))

    def conditioning(self, vlm, features, image_mask):
        return self.routing.set(image_mask=image_mask)

    def text_only(self, vlm):
        return self.routing.set(image_mask=None)

    def trainable(self, vlm, stage=None) -> set[str]:
        return super().trainable(vlm, stage) | injected_parameter_names(vlm)
