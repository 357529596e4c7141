"""mPLUG-Owl2's modality-adaptive LayerNorm (Ye et al., 2024, "mPLUG-Owl2: Revolutionizing
Multi-modal Large Language Model with Modality Collaboration", the LayerNorm half of its
modality-adaptive module): image tokens enter the LM through an MLP projector, and in each selected
decoder layer every norm (Llama / Qwen2 / Gemma RMSNorms, GPT-2's LayerNorms) gets a trainable
copy, initialised from the LM's own, that only image positions use. Text positions keep the frozen
norms, so text is exactly the base LM's, with or without an image in the batch. Deep fusion at a
tiny cost: a few thousand parameters per layer, against the visual expert's full weight copies.

In the LM's last layer only the norm before attention gets a copy: there an image row reaches the
loss only through its keys and values (its own output is never scored), so a copy of the norm before
the MLP would count as trainable without ever receiving a gradient."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import decoder_layers, layer_indices
from fusionbench.fusion.base import register
from fusionbench.fusion.inject import ImageRowExpert, TokenRouting, inject_layers
from fusionbench.fusion.projector import MLPOptions, MLPProjector


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, as HF decoders name their classes (``LlamaRMSNorm``, ``Gemma3RMSNorm``, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@dataclass
class MALNOptions(MLPOptions):
    #: decoder layers whose norms get image copies: all, top_half, bottom_half, every_N or a list of indices
    layers: Any = "all"


@register("ma_ln")
class ModalityAdaptiveLN(MLPProjector):
    """MLP projector + per-layer trainable copies of the decoder layers' norms, used only at
    image positions (text positions: the frozen norms)."""

    Options = MALNOptions
    TEXT_PATH = "frozen"  # text rows run the frozen norms

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self.routing = TokenRouting()

    def norms(self, vlm) -> dict[int, list[str]]:
        """Selected layer index -> names of the norms that get copies (direct children of the layer,
        in the order the layer registers them: the first one is the norm before attention)."""
        path, layers = decoder_layers(vlm.lm)
        out = {}
        for i in layer_indices(self.options.layers, len(layers), "fusion.layers"):
            names = [n for n, m in layers[i].named_children() if is_norm(m)]
            if not names:
                raise FusionBenchError(f"ma_ln: decoder layer {path}.{i} ({type(layers[i]).__name__}) has no "
                                       "LayerNorm / RMSNorm child")
            out[i] = names[:1] if i == len(layers) - 1 else names
        return out

    def validate(self, vlm) -> None:
        self.norms(vlm)

    def inject(self, vlm) -> None:
        _, layers = decoder_layers(vlm.lm)
        for i, names in self.norms(vlm).items():
            inject_layers(layers[i], lambda n, m: n in names, lambda n, m: ImageRowExpert(m, self.routing))

    def conditioning(self, vlm, features, image_mask):
        return self.routing.set(image_mask=image_mask)

    def text_only(self, vlm):
        return self.routing.set(image_mask=None)
