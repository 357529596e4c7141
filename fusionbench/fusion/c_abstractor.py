"""Honeybee's C-Abstractor (Cha et al., 2024, "Honeybee: Locality-enhanced Projector for Multimodal
LLM"), following its ``CAbstractor``: the vision feature tokens are put back on their square grid
``[B, C, H, W]`` (a leading CLS token dropped), passed through RegNet bottleneck blocks, adaptively
average-pooled to a ``sqrt(num_queries)`` square, passed through more blocks and projected by an MLP
into the frozen LM's embedding space, as ``num_queries`` image tokens (like ``linear``/``mlp``).
Unlike a resampler (Q-Former, Perceiver), the number of image tokens is decoupled from the grid *and*
each output token summarises a spatial neighbourhood, so the layout of the image survives the
compression (Honeybee's "locality preservation"). The LM sees images only at its input, so its text
path is untouched."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion.base import FusionOptions, FusionStrategy, ranged, register


@dataclass
class CAbstractorOptions(FusionOptions):
    #: image tokens given to the LM: a square number, at most the vision grid's token count (the
    #: pooled grid is sqrt x sqrt; Honeybee: 144 from 256). 16 = the token budget of linear/mlp/qformer
    #: on the default tier (EfficientNet pooled to 4x4) and of the tiny tier's 4x4 tiny_cnn grid
    num_queries: int = ranged(16, low=1)
    #: bottleneck blocks before and after the pooling (Honeybee: 3)
    depth: int = ranged(3, low=1)
    #: channel width of the conv blocks (0: min(LM hidden size, 256); Honeybee: 1024)
    hidden_size: int = ranged(0)
    #: layers of the SiLU MLP read-out to the LM width (Honeybee: 2)
    mlp_depth: int = ranged(2, low=1)
    #: learned position embedding added to the vision tokens before the convs (Honeybee: true)
    pos_emb: bool = True


def feature_grid(vision_tokens: int) -> tuple[int, bool]:
    """Side of the square feature grid and whether a leading CLS token is to be dropped."""
    side = math.isqrt(vision_tokens)
    if vision_tokens >= 1 and side * side == vision_tokens:
        return side, False
    side = math.isqrt(vision_tokens - 1) if vision_tokens > 1 else 0
    if side >= 1 and side * side + 1 == vision_tokens:
        return side, True
    raise FusionBenchError(f"c_abstractor needs vision tokens on a square grid (side*side, or side*side + 1 "
                           f"with a CLS token); this vision encoder gives {vision_tokens} tokens")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class Bottleneck(nn.Module):
    """RegNet bottleneck (timm's ``Bottleneck`` with bottle_ratio 1, group size 1, SE 0.25), as
    Honeybee's ``RegStage``: 1x1 -> 3x3 depthwise -> SE -> 1x1, residual, SiLU."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.norm1 = LayerNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch, bias=False)
        self.norm2 = LayerNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, max(1, int(round(in_ch * se_ratio))))
        self.conv3 = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.norm3 = LayerNorm2d(out_ch)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch))
                         if in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        y = F.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(self.se(y)))
        return F.silu(y + self.shortcut(x))


def reg_stage(depth: int, in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(*(Bottleneck(in_ch if i == 0 else out_ch, out_ch) for i in range(depth)))


@register("c_abstractor")
class CAbstractor(FusionStrategy):
    """Honeybee C-Abstractor: conv blocks -> adaptive average pool -> conv blocks -> MLP;
    ``num_queries`` image tokens; LM frozen."""
    Options = CAbstractorOptions
    TEXT_PATH = "frozen"

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        o = options
        dim = self.connector_width()
        side = math.isqrt(int(o.num_queries))
        if side * side != o.num_queries:
            raise FusionBenchError(f"fusion.num_queries must be a square number for strategy 'c_abstractor' "
                                   f"(the pooled grid is side x side), got {o.num_queries}; "
                                   f"e.g. {side * side} or {(side + 1) ** 2}")
        grid, cls_token = feature_grid(vision_tokens)
        if side > grid:
            raise FusionBenchError(f"fusion.num_queries={o.num_queries} ({side}x{side}) is more than the vision "
                                   f"feature grid ({grid}x{grid} = {grid * grid} tokens) it pools from")
        self.hidden_size, self.grid, self.side, self.cls_token = dim, grid, side, cls_token
        self.pos_emb = nn.Parameter(torch.randn(grid * grid, vision_dim) * 0.02) if o.pos_emb else None
        self.s1 = reg_stage(o.depth, vision_dim, dim)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.s2 = reg_stage(o.depth, dim, dim)
        layers: list[nn.Module] = [nn.Linear(dim, lm_hidden_size)]
        for _ in range(o.mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(lm_hidden_size, lm_hidden_size)]
        self.readout = nn.Sequential(*layers)

    @property
    def num_image_tokens(self) -> int:
        return int(self.options.num_queries)

    def image_embeddings(self, features):
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.vision_tokens, self.vision_dim):
            raise FusionBenchError(f"c_abstractor expects vision features [batch, {self.vision_tokens}, "
                                   f"{self.vision_dim}], got {list(features.shape)}")
        x = features[:, 1:] if self.cls_token else features
        x = x.to(self.readout[0].weight.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        b = x.shape[0]
        x = x.transpose(1, 2).reshape(b, self.vision_dim, self.grid, self.grid)  # row-major, as the encoders flatten
        x = self.s2(self.pool(self.s1(x)))
        return self.readout(x.flatten(2).transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"strategy='c_abstractor', grid={self.grid}x{self.grid}{' +CLS' if self.cls_token else ''} "
                f"-> {self.side}x{self.side}")
