"""LoRA fusion: an MLP projector for image tokens (LLaVA-1.5) plus peft LoRA adapters on the LM's
attention and MLP layers, trained together. The text path changes (adapters stay active in
text-only evaluation: that is the forgetting measured); ``base_lm()`` switches the adapters off."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from fusionbench.errors import FusionBenchError, first_line
from fusionbench.fusion._lm import PROJECTIONS, decoder_layers, peft_model
from fusionbench.fusion.base import ranged, register
from fusionbench.fusion.projector import MLPOptions, MLPProjector


@dataclass
class LoraOptions(MLPOptions):
    #: LoRA rank
    r: int = ranged(8, low=1)
    #: LoRA scaling numerator (the update is scaled by alpha / r)
    alpha: float = ranged(16.0, low=0, above=True)
    #: dropout on the LoRA branch input
    dropout: float = ranged(0.0, low=0, high=1, below=True)
    #: "all-linear": every Linear / Conv1D inside the decoder blocks; or a list of module names
    #: (peft suffix match, e.g. [q_proj, v_proj] or [c_attn] for GPT-2); or a regex string
    #: (peft full match against the LM's module paths)
    target_modules: Any = "all-linear"


def resolve_targets(lm: nn.Module, spec: Any) -> tuple[str | list[str], list[str]]:
    """``(peft target_modules, LM module paths it selects)``; :class:`FusionBenchError` if a
    requested name or pattern selects no Linear / Conv1D layer."""
    path, blocks = decoder_layers(lm)
    inner = sorted({n for block in blocks for n, m in block.named_modules() if isinstance(m, PROJECTIONS)})
    adaptable = [n for n, m in lm.named_modules() if isinstance(m, PROJECTIONS)]
    if isinstance(spec, str):
        target: str | list[str] = spec if spec != "all-linear" else \
            rf"{re.escape(path)}\.\d+\.({'|'.join(re.escape(n) for n in inner)})"
        try:
            selected = [n for n in adaptable if re.fullmatch(target, n)]
        except re.error as e:
            raise FusionBenchError(f"fusion.target_modules {spec!r} is not a valid regex: {e}") from None
        unmatched = [] if selected else [spec]
    else:
        target = [str(t) for t in spec]
        hits = {t: [n for n in adaptable if n == t or n.endswith("." + t)] for t in target}
        selected = [n for ns in hits.values() for n in ns]
        unmatched = [t for t, ns in hits.items() if not ns] or ([] if target else ["(an empty list)"])
    if unmatched:
        raise FusionBenchError(f"fusion.target_modules {unmatched} matches no Linear / Conv1D layer of "
                               f"{type(lm).__name__}; names inside its decoder blocks: {', '.join(inner) or 'none'} "
                               f"(or use 'all-linear')")
    return target, selected


@register("lora")
class LoraFusion(MLPProjector):
    """MLP projector + peft LoRA on the LM's Linear / Conv1D layers (B = 0 at start: untrained,
    the LM is exactly the base LM). Trains the projector and every ``lora_A`` / ``lora_B``."""
    Options = LoraOptions
    TEXT_PATH = "trained"  # the adapters stay on for text

    def validate(self, vlm):
        o = self.options
        resolve_targets(vlm.lm, o.target_modules)

    def inject(self, vlm):
        from peft import LoraConfig

        o = self.options
        target, selected = resolve_targets(vlm.lm, o.target_modules)
        modules = dict(vlm.lm.named_modules())
        fan_in_fan_out = all(isinstance(modules[n], Conv1D) for n in selected)  # GPT-2 stores W transposed
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=target,
                            fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
        try:
            vlm.lm = peft_model(vlm.lm, config)
        except ValueError as e:
            raise FusionBenchError(f"lora: peft could not apply target_modules {o.target_modules!r}: "
                                   f"{first_line(e)}") from None

    def base_lm(self, vlm):
        """The base LM exactly: LoRA adapters off (peft ``disable_adapter``)."""
        return vlm.lm.disable_adapter()

    def trainable(self, vlm, stage=None):
        lora = {n for n, _ in vlm.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        return super().trainable(vlm, stage) | lora
