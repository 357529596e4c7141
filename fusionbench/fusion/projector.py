"""LLaVA-style projectors: vision features mapped into the LM embedding space and spliced in as
image tokens. Shallow alignment: the LM (frozen) sees images only at its input."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fusionbench.fusion.base import FusionOptions, FusionStrategy, ranged, register


@register("linear")
class LinearProjector(FusionStrategy):
    """LLaVA-1: one linear layer from vision features to LM embeddings, one image token per feature."""
    TEXT_PATH = "frozen"  # the LM is untouched

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self.projector = self.build_projector()

    def build_projector(self) -> nn.Module:
        return nn.Linear(self.vision_dim, self.lm_hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tokens

    def image_embeddings(self, features):
        return self.projector(features)


@dataclass
class MLPOptions(FusionOptions):
    #: hidden width of the 2-layer MLP (0: the LM hidden size, as in LLaVA-1.5)
    hidden_size: int = ranged(0)


@register("mlp")
class MLPProjector(LinearProjector):
    """LLaVA-1.5: a 2-layer GELU MLP projector."""

    Options = MLPOptions
    TEXT_PATH = "frozen"

    def build_projector(self) -> nn.Module:
        hidden = self.options.hidden_size or self.lm_hidden_size
        return nn.Sequential(nn.Linear(self.vision_dim, hidden), nn.GELU(), nn.Linear(hidden, self.lm_hidden_size))
