"""Flamingo (Alayrac et al., 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"; as
in OpenFlamingo, Awadalla et al., 2023): a Perceiver resampler turns the vision features into a
fixed number of visual latents, and tanh-gated cross-attention blocks (cross-attention + FFN, each
scaled by ``tanh(gate)`` with the gate initialised at 0) inserted before frozen LM decoder layers
let every text token read them. No image tokens are spliced into the input; at initialisation the
model is exactly the base LM.

Text-only mode: without an image, the wrapped layers are pure pass-throughs (the base LM, also
after training). OpenFlamingo instead runs the gated FFN on every token, media or not, so training
moves its text path; ``text_path_drift: true`` reproduces that, to measure the forgetting it costs.

Simplifications: one image per sequence, attended by every token of it (Flamingo's "only the
immediately preceding image" rule reduces to this); a learned position embedding on the vision
tokens before resampling (a CNN grid carries no explicit position)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import decoder_layers, layer_indices
from fusionbench.fusion.base import FusionOptions, FusionStrategy, ranged, register
from fusionbench.fusion.inject import Conditioning, InjectedLayer, inject_layers
from fusionbench.fusion.qformer import attend


@dataclass
class FlamingoOptions(FusionOptions):
    #: visual latents produced by the Perceiver resampler (Flamingo: 64)
    num_latents: int = ranged(64, low=1)
    #: Perceiver resampler layers (Flamingo: 6)
    resampler_depth: int = ranged(2, low=1)
    #: width of the resampler and of the cross-attention (0: min(LM hidden size, 256))
    hidden_size: int = ranged(0)
    #: attention heads of the resampler and of the cross-attention (must divide the width)
    num_heads: int = ranged(4, low=1)
    #: a gated cross-attention block before decoder layers N-1, 2N-1, ... (OpenFlamingo's rule)
    cross_attention_every: int = ranged(1, low=1)
    #: explicit layer selection instead (list of indices, "all", "top_half", "every_N", ...)
    layer_indices: Any = None
    #: FFN width of the gated blocks as a multiple of the LM hidden size (Flamingo: 4)
    ffn_mult: int = ranged(4, low=1)


def _ffn(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


class PerceiverLayer(nn.Module):
    """Latents attend to ``[vision tokens; latents]`` (Flamingo's resampler attention), then FFN."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ffn = _ffn(dim, 4)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), lat], dim=1)
        latents = latents + attend(self.q, self.kv, self.out, self.heads, lat, context)
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """Vision features ``[B, N, Dv]`` -> ``num_latents`` latents ``[B, L, dim]``."""

    def __init__(self, vision_dim: int, vision_tokens: int, dim: int, depth: int, heads: int, num_latents: int):
        super().__init__()
        self.input = nn.Linear(vision_dim, dim)
        self.pos = nn.Parameter(torch.randn(vision_tokens, dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.input(features) + self.pos
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


class GatedCrossAttention(nn.Module):
    """``x += tanh(attn_gate) * xattn(x, latents)``; ``x += tanh(ff_gate) * ffn(x)`` (gates start at 0)."""

    def __init__(self, lm_dim: int, dim: int, heads: int, ffn_mult: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(lm_dim)
        self.q = nn.Linear(lm_dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, lm_dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(lm_dim, ffn_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
        if latents is not None:
            x = x + torch.tanh(self.attn_gate) * attend(self.q, self.kv, self.out, self.heads, self.norm(x), latents)
        return x + torch.tanh(self.ff_gate) * self.ffn(x)


class FlamingoLayer(InjectedLayer):
    """A decoder layer with a gated cross-attention block before it, reading the conditioning's
    ``latents``; ``base_layer`` gets the caller's arguments (only ``hidden_states`` replaced). With no
    latents it is the base layer unless ``text_path`` (OpenFlamingo's behaviour) runs the gated FFN;
    with ``bypass`` (:meth:`Flamingo.base_lm`) it is always the base layer."""

    rows = "all"  # text after the image attends to it, by design

    def __init__(self, base_layer: nn.Module, xattn: GatedCrossAttention, conditioning: Conditioning,
                 text_path: bool = False):
        super().__init__(base_layer, conditioning)
        self.xattn = xattn
        self.text_path = text_path

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_layer.train(False)  # the frozen decoder layer keeps dropout off while the block trains
        return self

    def forward(self, *args, **kwargs):
        latents = self.conditioning.get("latents")
        if self.conditioning.get("bypass") or (latents is None and not self.text_path):
            return self.base_layer(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if latents is not None and latents.shape[0] != hidden.shape[0]:  # e.g. beam search expansion
            latents = latents.repeat_interleave(hidden.shape[0] // latents.shape[0], dim=0)
        dtype = self.xattn.attn_gate.dtype
        new = self.xattn(hidden.to(dtype), None if latents is None else latents.to(dtype)).to(hidden.dtype)
        if args:
            args = (new, *args[1:])
        else:
            kwargs["hidden_states"] = new
        return self.base_layer(*args, **kwargs)


@register("flamingo")
class Flamingo(FusionStrategy):
    """Perceiver resampler + tanh-gated cross-attention before selected frozen LM decoder layers."""

    Options = FlamingoOptions
    TEXT_PATH = "conditioned"  # text after the image cross-attends to it (text_path_drift: see below)
    HAS_TEXT_PATH_DRIFT = True

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        o = options
        dim = self.connector_width("resampler/cross-attention")
        self.hidden_size = dim
        self.resampler = PerceiverResampler(vision_dim, vision_tokens, dim, o.resampler_depth, o.num_heads,
                                            o.num_latents)
        #: the injected wrappers, in layer order (they live inside the LM: a plain list, not registered twice)
        self.gated_layers: list[FlamingoLayer] = []
        self._conditioning = Conditioning()
        self.layers_with_cross_attention: list[int] = []

    @classmethod
    def text_invariant_for(cls, options) -> bool:
        return not options.text_path_drift  # OpenFlamingo's drifting FFN on text is opt-in

    # -- 1. what it adds ---------------------------------------------------------------------------
    def select_layers(self, num_layers: int) -> list[int]:
        """Decoder layer indices that get a gated cross-attention block."""
        o = self.options
        if o.layer_indices is not None:
            return layer_indices(o.layer_indices, num_layers, "fusion.layer_indices")
        every = int(o.cross_attention_every)
        if every > num_layers:
            raise FusionBenchError(f"fusion.cross_attention_every={every} selects no layer: this LM has "
                                   f"{num_layers} decoder layers")
        return [i for i in range(num_layers) if (i + 1) % every == 0]

    def validate(self, vlm):
        _, layers = decoder_layers(vlm.lm)
        self.select_layers(len(layers))

    def inject(self, vlm):
        path, layers = decoder_layers(vlm.lm)
        self.layers_with_cross_attention = self.select_layers(len(layers))
        chosen = {f"{path}.{i}" for i in self.layers_with_cross_attention}
        o = self.options
        new = inject_layers(vlm.lm, lambda name, m: name in chosen, lambda name, m: FlamingoLayer(
            m, GatedCrossAttention(self.lm_hidden_size, self.hidden_size, o.num_heads, o.ffn_mult),
            self._conditioning, text_path=bool(o.text_path_drift)))
        self.gated_layers = [layer for _, layer in new]

    # -- 2. how images reach the LM ---------------------------------------------------------------
    def conditioning(self, vlm, features, image_mask):
        return self._conditioning.set(latents=self.resampler(features.to(self.resampler.latents.dtype)))

    def text_only(self, vlm):
        return self._conditioning.set(latents=None)

    def base_lm(self, vlm):
        """Every injected block bypassed: the base LM, also with ``text_path_drift``."""
        return self._conditioning.set(latents=None, bypass=True)

    def extra_repr(self) -> str:
        return f"strategy='flamingo', cross_attention_layers={self.layers_with_cross_attention}"
