"""CogVLM-style deep fusion (Wang et al., 2023, "CogVLM: Visual Expert for Pretrained Language
Models"): image tokens enter the LM through an MLP projector, and in each selected decoder layer the
attention QKV, attention output and MLP weights get a trainable *visual expert* copy, initialised
from the LM's own weights, that only image tokens use. Text tokens keep the frozen original weights,
so text-only input is exactly the base LM and per-token FLOPs are unchanged (the expert replaces a
matmul for image rows, it never adds one). Where the decoder layer has an ``mlp`` block (Llama, Qwen2,
Gemma, GPT-2, ...) the block is copied whole (row-wise as a whole: the rows are split once per block,
not once per projection). In the LM's last layer only the key / value projections get experts: an
image row's output there reaches nothing (its logits are never scored), so copies of q / o / the MLP
would count as trainable without ever receiving a gradient."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import PROJECTIONS, decoder_layers, layer_indices
from fusionbench.fusion.base import register
from fusionbench.fusion.inject import ImageRowExpert, TokenRouting, inject_layers
from fusionbench.fusion.projector import MLPOptions, MLPProjector


#: projection names (last path component) whose output becomes attention keys or values: Llama /
#: Qwen2 / Gemma ``k_proj`` ``v_proj``, GPT-2's fused ``c_attn``, NeoX's ``query_key_value``, ...
_KV_NAMES = ("k_proj", "v_proj", "key", "value", "c_attn", "qkv", "qkv_proj", "query_key_value", "Wqkv", "kv_proj")


def _feeds_keys_or_values(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _KV_NAMES


@dataclass
class VisualExpertOptions(MLPOptions):
    #: decoder layers that get visual experts: all, top_half, bottom_half, every_N or a list of indices
    layers: Any = "all"


@register("visual_expert")
class VisualExpert(MLPProjector):
    """CogVLM visual expert: MLP projector + per-layer trainable copies of the attention QKV /
    output and MLP projections, applied only at image-token positions (text tokens: frozen LM)."""

    Options = VisualExpertOptions
    TEXT_PATH = "frozen"  # text rows run the frozen weights; the text before the image has no image row

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self.routing = TokenRouting()

    def _selected(self, vlm) -> list[tuple[str, nn.Module, bool]]:
        """``(name, decoder layer, is it the LM's last)`` of every selected layer."""
        path, layers = decoder_layers(vlm.lm)
        idx = layer_indices(self.options.layers, len(layers), "fusion.layers")
        return [(f"{path}.{i}", layers[i], i == len(layers) - 1) for i in idx]

    def validate(self, vlm) -> None:
        for name, layer, _ in self._selected(vlm):
            if not any(isinstance(m, PROJECTIONS) for m in layer.modules()):
                raise FusionBenchError(f"visual_expert: decoder layer {name} has no Linear / Conv1D projections")

    def inject(self, vlm) -> None:
        for _, layer, last in self._selected(vlm):
            # the whole MLP block is one expert (rows split once, not per projection); in the last
            # layer only key / value projections (see the module docstring)
            inject_layers(layer, lambda n, m: (n == "mlp" and not last) or (
                isinstance(m, PROJECTIONS) and (not last or _feeds_keys_or_values(n))),
                lambda n, m: ImageRowExpert(m, self.routing))

    def conditioning(self, vlm, features, image_mask):
        return self.routing.set(image_mask=image_mask)

    def text_only(self, vlm):
        return self.routing.set(image_mask=None)
