"""Deep prefix fusion (the p-tuning / prefix-tuning analogy CogVLM draws): image features become
per-layer key/value prefixes for every LM layer, passed as the LM's KV cache. Images occupy no
input tokens; the LM is frozen, and text without an image runs the base LM unchanged.

Optionally a learned, image-independent task prefix through peft (``PrefixTuningConfig``): it is
prepended to every input, text-only ones included, so the text path changes by design."""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from fusionbench.errors import FusionBenchError
from fusionbench.fusion._lm import cache_kwarg, decoder_layers, passed_cache, peft_model
from fusionbench.fusion.base import FusionOptions, FusionStrategy, ranged, register
from fusionbench.fusion.inject import Conditioning

POOLINGS = ("tokens", "pooled")


@dataclass
class PrefixOptions(FusionOptions):
    #: image prefix positions per LM layer
    prefix_length: int = ranged(8, low=1)
    #: hidden width of the feature -> key/value MLP (0: the LM hidden size)
    hidden_size: int = ranged(0)
    #: "tokens": vision tokens average-pooled to ``prefix_length`` slots, each mapped by one shared
    #: MLP (plus a learned slot embedding); "pooled": the mean feature mapped to all slots at once
    #: (output layer ``prefix_length`` times larger)
    pooling: str = "tokens"
    #: learned image-independent task prefix (peft ``PrefixTuningConfig``) of this many positions
    #: per layer, prepended to every input including text-only ones (0: off)
    task_prefix_tokens: int = ranged(0)


def kv_geometry(lm: nn.Module) -> tuple[int, int, int]:
    """``(layers, key/value heads, head dim)`` of an HF decoder (Llama/Qwen2/Gemma/GPT-2 naming)."""
    cfg = lm.config.get_text_config()
    layers = len(decoder_layers(lm)[1])
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not heads or not hidden:
        raise FusionBenchError(f"prefix: cannot read the attention geometry of {type(lm).__name__} "
                               "(num_attention_heads / hidden_size missing from its config)")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def prefix_positions(extended_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Position ids of the input tokens behind a prefix of ``prefix_len``: the count of attended
    positions before each token (as ``generate`` derives them from its mask), padding at 0."""
    pos = extended_mask.long().cumsum(-1) - 1
    return pos.masked_fill(extended_mask == 0, 0)[:, prefix_len:]


class ImagePrefixEncoder(nn.Module):
    """Vision features ``[B, N, Dv]`` -> keys and values ``[layers, 2, B, kv_heads, P, head_dim]``."""

    def __init__(self, vision_dim: int, hidden: int, prefix_length: int, pooling: str,
                 layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.prefix_length, self.pooling = prefix_length, pooling
        self.geometry = (layers, 2, kv_heads, head_dim)
        width = layers * 2 * kv_heads * head_dim
        self.inp = nn.Linear(vision_dim, hidden)
        if pooling == "tokens":
            self.slot = nn.Parameter(torch.randn(prefix_length, hidden) * 0.02)
            self.out = nn.Linear(hidden, width)
        else:
            self.out = nn.Linear(hidden, prefix_length * width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, p = features.shape[0], self.prefix_length
        if self.pooling == "tokens":
            slots = F.adaptive_avg_pool1d(features.transpose(1, 2), p).transpose(1, 2)  # [B, P, Dv]
            out = self.out(F.gelu(self.inp(slots) + self.slot))
        else:
            out = self.out(F.gelu(self.inp(features.mean(1))))
        layers, two, kv_heads, head_dim = self.geometry
        return out.view(b, p, layers, two, kv_heads, head_dim).permute(2, 3, 0, 4, 1, 5)


@contextlib.contextmanager
def _instance_override(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Set ``module.<name>`` (a method) on the instance for the duration; restore what was there."""
    had, old = name in module.__dict__, module.__dict__.get(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        if had:
            setattr(module, name, old)
        else:
            delattr(module, name)


@register("prefix")
class PrefixFusion(FusionStrategy):
    """Image -> per-layer key/value prefix (deep prefix) for every LM layer; LM frozen.

    Positions of the input tokens start after the prefix (``prefix_positions``), identically in
    the training forward, ``logits`` and ``generate``. The prefix cache is built fresh per call
    (the LM appends to it)."""

    Options = PrefixOptions
    TEXT_PATH = "conditioned"  # every token attends to the image prefix (a task prefix: see below)

    @classmethod
    def text_invariant_for(cls, options) -> bool:
        return options.task_prefix_tokens == 0  # a task prefix changes the text path by design

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self.encoder: ImagePrefixEncoder | None = None  # built in inject (needs the LM geometry)
        self._task_prefix = options.task_prefix_tokens > 0
        #: per-call state: ``base`` (inside base_lm(): no task prefix), ``text_prefix`` (inside
        #: text_only() with the task prefix on: text-only calls get it)
        self._state = Conditioning()

    # -- construction -------------------------------------------------------------------------
    def validate(self, vlm):
        o = self.options
        if o.pooling not in POOLINGS:
            raise FusionBenchError(f"fusion.pooling must be one of {', '.join(POOLINGS)}, got {o.pooling!r}")
        if getattr(vlm.lm.config, "is_encoder_decoder", False):
            raise FusionBenchError("prefix fusion needs a decoder-only LM")
        kv_geometry(vlm.lm)

    def inject(self, vlm):
        layers, kv_heads, head_dim = kv_geometry(vlm.lm)
        self.encoder = ImagePrefixEncoder(self.vision_dim, self.options.hidden_size or self.lm_hidden_size,
                                          self.options.prefix_length, self.options.pooling,
                                          layers, kv_heads, head_dim)
        if self._task_prefix:
            from peft import PrefixTuningConfig

            vlm.lm = peft_model(vlm.lm, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                           num_virtual_tokens=self.options.task_prefix_tokens))
            self._peft_lm = weakref.ref(vlm.lm)
            # text-only training forward goes through get_decoder(), which peft does not see
            vlm.lm.get_decoder().register_forward_pre_hook(self._text_prefix_hook, with_kwargs=True)

    # -- the prefix cache -----------------------------------------------------------------------
    def _task_kv(self, lm, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) of the peft task prefix (empty when off or inside ``base_lm``)."""
        if not self._task_prefix or self._state.get("base"):
            return []
        prompt = lm.get_prompt(batch)  # a DynamicCache, one layer per LM layer (peft reads the LM's config)
        return [(layer.keys, layer.values) for layer in prompt.layers]

    def prefix_cache(self, lm, batch: int, features: torch.Tensor | None) -> DynamicCache:
        """A fresh cache holding [task prefix | image prefix] for every LM layer of ``lm``."""
        task = self._task_kv(lm, batch)
        image = self.encoder(features) if features is not None else None
        dtype = lm.get_input_embeddings().weight.dtype
        cache = DynamicCache(config=lm.config.get_text_config())
        for i in range(self.encoder.geometry[0]):
            parts = ([task[i]] if task else []) + ([(image[i, 0], image[i, 1])] if image is not None else [])
            keys, values = (torch.cat([kv[j] for kv in parts], 2).to(dtype) for j in (0, 1))
            cache.update(keys, values, i)
        return cache

    @staticmethod
    def _extend(cache: DynamicCache, attention_mask: torch.Tensor, model: nn.Module) -> dict[str, Any]:
        """LM kwargs for ``model``'s forward (or ``generate``): the prefix cache under the keyword
        this transformers version uses, the attention mask extended over it, positions after it."""
        p = cache.get_seq_length()
        ext = torch.cat([attention_mask.new_ones(attention_mask.shape[0], p), attention_mask], 1)
        return {cache_kwarg(model): cache, "attention_mask": ext, "position_ids": prefix_positions(ext, p)}

    def lm_kwargs(self, vlm, features, attention_mask):
        if features is None:
            return {}
        if attention_mask is None:
            raise FusionBenchError("prefix fusion needs an attention_mask (it is extended by the prefix)")
        return self._extend(self.prefix_cache(vlm.lm, features.shape[0], features), attention_mask,
                            vlm.lm.get_decoder())

    def _task_prefix_kwargs(self, lm, x: torch.Tensor, mask: torch.Tensor | None, model: nn.Module) -> dict[str, Any]:
        """:meth:`_extend` kwargs putting the task prefix alone before text-only input ``x``."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return self._extend(self.prefix_cache(lm, x.shape[0], None), mask, model)

    def _text_prefix_hook(self, module, args, kwargs):
        """Text-only calls into the decoder without a cache get the task prefix (forward pass). A
        call that already carries a cache (``generate``'s, which holds the prefix) is left alone,
        whichever keyword the cache came by."""
        if not self._state.get("text_prefix") or passed_cache(kwargs) is not None:
            return None
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        kwargs.update(self._task_prefix_kwargs(self._peft_lm(), x, kwargs.get("attention_mask"), module))
        return args, kwargs

    # -- LM calls -------------------------------------------------------------------------------
    def _generate_shim(self, vlm, hf_generate):
        """``generate`` with a prefix cache: transformers expects ``inputs_embeds`` to cover the
        cached positions too (it slices off ``cache length`` rows), so zero rows stand in for the
        prefix. Text-only calls get the task prefix cache here."""

        def generate(*args, **kwargs):
            embeds = kwargs.get("inputs_embeds")
            if passed_cache(kwargs) is None and self._state.get("text_prefix") and embeds is not None:
                kwargs.update(self._task_prefix_kwargs(vlm.lm, embeds, kwargs.get("attention_mask"),
                                                       vlm.lm.get_decoder()))
            cache = passed_cache(kwargs)
            if cache is not None and embeds is not None:
                stand_in = embeds.new_zeros(embeds.shape[0], cache.get_seq_length(), embeds.shape[2])
                kwargs["inputs_embeds"] = torch.cat([stand_in, embeds], 1)
            return hf_generate(*args, **kwargs)

        return generate

    @contextlib.contextmanager
    def _calls(self, vlm) -> Iterator[None]:
        """LM call state: our generate; with a task prefix, peft's own prefix injection in forward
        off (we pass it) and transformers' ``generate`` under ours (peft's fails on
        ``inputs_embeds`` for prompt learning)."""
        lm = vlm.lm
        with contextlib.ExitStack() as stack:
            if self._task_prefix:
                stack.enter_context(_instance_override(lm, "forward", lm.base_model.forward))
            hf_generate = lm.base_model.generate if self._task_prefix else lm.generate
            stack.enter_context(_instance_override(lm, "generate", self._generate_shim(vlm, hf_generate)))
            yield

    def conditioning(self, vlm, features, image_mask):
        return self._calls(vlm)

    @contextlib.contextmanager
    def text_only(self, vlm):
        if not self._task_prefix:
            yield
            return
        with self._state.set(text_prefix=not self._state.get("base")), self._calls(vlm):
            yield

    @contextlib.contextmanager
    def base_lm(self, vlm):
        """Without a task prefix: the text path already is the base LM. With one: peft's
        ``disable_adapter()`` and no task prefix in the caches we build."""
        if not self._task_prefix:
            with super().base_lm(vlm):
                yield
            return
        with self._state.set(base=True), vlm.lm.disable_adapter():
            yield

    def trainable(self, vlm, stage=None):
        """The prefix encoder and peft's task prefix (``lm.prompt_encoder``, present only with one)."""
        prompt = {n for n, _ in vlm.named_parameters() if n.startswith("lm.prompt_encoder.")}
        return super().trainable(vlm, stage) | prompt
