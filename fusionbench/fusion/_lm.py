"""Generic access to the inside of any HF decoder-only LM (Llama, Qwen2, Gemma, GPT-2, ...), so a
strategy that injects modules needs no per-family code."""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from fusionbench.errors import FusionBenchError


#: Linear layers as HF decoders build them: ``nn.Linear`` and GPT-2's transposed ``Conv1D``
PROJECTIONS = (nn.Linear, Conv1D)


def peft_model(lm: nn.Module, config: Any) -> nn.Module:
    """peft's ``get_peft_model``, quiet about the transformers attribute (deprecated in v5) it probes."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        return get_peft_model(lm, config)


def decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the LM's decoder blocks: the ``ModuleList`` whose length is
    the config's layer count (``model.layers`` in Llama/Qwen/Gemma, ``transformer.h`` in GPT-2)."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    found = [(name, m) for name, m in lm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise FusionBenchError(f"cannot find the {n} decoder layers of {type(lm).__name__}")
    return min(found, key=lambda item: item[0].count("."))  # the outermost match


#: the names transformers has given the KV-cache keyword of a forward: ``cache`` from 5.24 on,
#: ``past_key_values`` before (5.24 still maps the old name, with a warning, until 5.40)
CACHE_KWARGS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), "past_key_values")


def cache_kwarg(module: nn.Module) -> str:
    """The keyword this HF model's (or decoder's) ``forward`` takes a KV cache by, for this
    transformers version. ``generate`` passes its model kwargs through to that forward, so a cache
    handed to ``generate`` goes under the same name."""
    return _forward_cache_kwarg(type(module))


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a forward / generate call's ``kwargs``, under either name (or None)."""
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def output_cache(out: Any) -> Any:
    """The KV cache an HF model output returned (``out.cache`` from transformers 5.24 on,
    ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def layer_indices(spec, num_layers: int, what: str) -> list[int]:
    """Layer selection from a config: ``"all"``, ``"top_half"``, ``"bottom_half"``, an int stride
    ``"every_N"`` or an explicit list (negative indices count from the top). Out-of-range indices
    are an error naming the valid range."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "bottom_half":
            return list(range(num_layers // 2))
        if spec == "top_half":
            return list(range(num_layers // 2, num_layers))
        if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) > 0:
            return list(range(0, num_layers, int(spec[6:])))
        raise FusionBenchError(f"{what}: unknown layer selection {spec!r} (all, top_half, bottom_half, "
                               f"every_N or a list of indices)")
    out = []
    for i in spec:
        j = int(i)
        if not -num_layers <= j < num_layers:
            raise FusionBenchError(f"{what}: layer {j} does not exist; this LM has layers 0..{num_layers - 1}")
        out.append(j % num_layers)
    if not out:
        raise FusionBenchError(f"{what}: the layer selection is empty")
    return sorted(set(out))
