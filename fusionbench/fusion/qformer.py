"""BLIP-2 Q-Former (Li et al., 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models"): a fixed set of learned queries reads the frozen vision
features through cross-attention (inserted every ``cross_attention_every`` blocks, BLIP-2 uses 2)
interleaved with self-attention among the queries and an FFN; the query outputs are projected
linearly into the frozen LM's embedding space and spliced in as ``num_queries`` image tokens (a
soft visual prompt). The LM sees images only at its input, so its text path is untouched.

Differences from BLIP-2, all for training from scratch at this scale: pre-LayerNorm blocks
(BLIP-2 initialises a post-LN BERT), no image-text contrastive/matching pre-training stage, and a
learned position embedding on the vision tokens (cross-attention is permutation-invariant and a
CNN grid carries no explicit position; a ViT's features would)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion.base import FusionOptions, FusionStrategy, ranged, register


@dataclass
class QFormerOptions(FusionOptions):
    #: learned queries = image tokens given to the LM (BLIP-2: 32)
    num_queries: int = ranged(32, low=1)
    #: Q-Former blocks (BLIP-2: 12)
    num_layers: int = ranged(4, low=1)
    #: Q-Former width (0: min(LM hidden size, 256))
    hidden_size: int = ranged(0)
    #: attention heads (must divide the width)
    num_heads: int = ranged(4, low=1)
    #: blocks ``0, k, 2k, ...`` cross-attend to the vision features (BLIP-2: 2)
    cross_attention_every: int = ranged(2, low=1)
    #: FFN width as a multiple of the Q-Former width
    ffn_mult: int = ranged(4, low=1)


def attend(q_proj, kv_proj, out_proj, heads: int, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of ``x`` to ``context`` (``kv_proj``: keys and values in one matmul)."""
    b, n, _ = x.shape
    q = q_proj(x).view(b, n, heads, -1).transpose(1, 2)
    k, v = kv_proj(context).view(b, context.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)
    return out_proj(y.transpose(1, 2).reshape(b, n, -1))


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attend(self.q, self.kv, self.out, self.heads, x, context)


class QFormerBlock(nn.Module):
    """Pre-LN block: query self-attention, optional cross-attention to vision features, FFN."""

    def __init__(self, dim: int, heads: int, vision_dim: int, cross: bool, ffn_mult: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, heads, vision_dim) if cross else None
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, q: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        if self.cross_attn is not None:
            q = q + self.cross_attn(self.norm_cross(q), vision)
        return q + self.ffn(self.norm_ffn(q))


@register("qformer")
class QFormer(FusionStrategy):
    """BLIP-2 Q-Former connector: ``num_queries`` image tokens; LM frozen."""

    Options = QFormerOptions
    TEXT_PATH = "frozen"

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        o = options
        dim = self.connector_width("Q-Former")
        self.hidden_size = dim
        self.vision_norm = nn.LayerNorm(vision_dim)
        self.vision_pos = nn.Parameter(torch.randn(vision_tokens, vision_dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(o.num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(
            QFormerBlock(dim, o.num_heads, vision_dim, i % o.cross_attention_every == 0, o.ffn_mult)
            for i in range(o.num_layers))
        self.norm = nn.LayerNorm(dim)
        self.projector = nn.Linear(dim, lm_hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return int(self.options.num_queries)

    def image_embeddings(self, features):
        if features.shape[1:] != self.vision_pos.shape:
            raise FusionBenchError(f"qformer expects vision features [batch, {self.vision_tokens}, {self.vision_dim}], "
                                   f"got {list(features.shape)}")
        vision = self.vision_norm(features.to(self.queries.dtype) + self.vision_pos)
        q = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, vision)
        return self.projector(self.norm(q))
