"""The composed model: vision encoder -> fusion strategy -> pretrained causal LM."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from fusionbench.errors import FusionBenchError
from fusionbench.fusion import FUSIONS, FusionStrategy, fusion_options
from fusionbench.fusion._lm import cache_kwarg, output_cache

#: placeholder id for image positions in ``input_ids`` (never a real vocabulary id)
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


@contextlib.contextmanager
def on_device(*modules: nn.Module | None, device: torch.device):
    """The ``modules`` (None: skipped) on ``device`` inside the block, each back where its first
    parameter was after it, also on an error (nothing moves when a module is already there)."""
    present = [m for m in modules if m is not None]
    homes = [next(m.parameters()).device for m in present]
    try:
        for m in present:
            m.to(device)
        yield
    finally:
        for m, home in zip(present, homes):
            m.to(home)


@contextlib.contextmanager
def scoring_mode():
    """How every score of a trained model is computed: decoder layers compiled for training
    (``trainer.compile``) run eagerly, the kernels the base LM was scored with, so a frozen text
    path still matches it exactly (compiled kernels fuse and reorder reductions)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def lm_head(lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's output layer (with Gemma-2-style final soft-capping where the config has it)."""
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def lm_logits_at(lm: nn.Module, input_ids, attention_mask, positions) -> torch.Tensor:
    """A bare causal LM's logits at ``positions [B, T]`` only: ``[N, V]``. The same computation
    as :meth:`VisionLanguageModel.logits` with ``positions`` in text-only mode."""
    hidden, _ = text_hidden(lm, input_ids, attention_mask)
    return lm_head(lm, hidden[positions])


def text_hidden(model: nn.Module, input_ids, attention_mask, position_ids=None, past_key_values=None,
                use_cache: bool = False):
    """``(last hidden states [B, T, D], KV cache or None)`` of text-only input, for a bare HF causal
    LM or a :class:`VisionLanguageModel` (its strategy's text-only path): the one computation both
    are scored by (``position_ids`` / ``past_key_values`` for scoring continuations on a cached
    context)."""
    # on the model's device: the text suite builds CPU batches, and the forgetting curve scores
    # while Lightning holds the model on the accelerator
    device = (model.lm if isinstance(model, VisionLanguageModel) else model).get_input_embeddings().weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kw = {"position_ids": position_ids.to(device) if position_ids is not None else None, "use_cache": use_cache}
    if isinstance(model, VisionLanguageModel):
        with model._lm_context(input_ids, attention_mask, None) as kwargs:
            decoder = model.lm.get_decoder()
            out = decoder(**kwargs, **kw, **{cache_kwarg(decoder): past_key_values})
    else:
        decoder = model.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kw,
                      **{cache_kwarg(decoder): past_key_values})
    return out.last_hidden_state, (output_cache(out) if use_cache else None)


class VisionLanguageModel(nn.Module):
    """``vision`` (frozen unless a strategy says otherwise), ``fusion`` (the strategy's own modules),
    ``lm`` (an HF causal LM, possibly with modules injected by the strategy)."""

    def __init__(self, vision: nn.Module, lm: nn.Module, tokenizer, fusion: FusionStrategy):
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.fusion = fusion
        self.tokenizer = tokenizer
        fusion.validate(self)
        fusion.inject(self)
        self.stage: str | None = None
        self.set_stage(None)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: DictConfig, backbones=None) -> "VisionLanguageModel":
        """Build from an experiment config; ``backbones=(vision, lm, tokenizer)`` reuses loaded ones."""
        from fusionbench.assets.lm import load_lm
        from fusionbench.assets.vision import load_vision

        options = fusion_options(cfg.fusion)
        strategy_cls = FUSIONS.get(options.name)
        if backbones is None:
            vision = load_vision(cfg.vision, seed=cfg.seed)
            lm, tok = load_lm(cfg.lm, seed=cfg.seed)
        else:
            vision, lm, tok = backbones
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            fusion = strategy_cls(options, lm.config.get_text_config().hidden_size, vision.feature_dim,
                                  vision.num_tokens)
            model = cls(vision, lm, tok, fusion)
        model.feature_cache = bool(cfg.vision.feature_cache)
        model.cache_text_prefix = bool(cfg.trainer.cache_text_prefix)
        return model

    @property
    def num_image_tokens(self) -> int:
        return self.fusion.num_image_tokens

    # -- what trains ----------------------------------------------------------------------------
    def set_stage(self, stage: str | None) -> None:
        if stage is not None and stage not in self.fusion.stage_names:
            raise FusionBenchError(f"strategy {self.fusion.registry_name!r} has no stage {stage!r}; "
                                   f"its stages: {', '.join(self.fusion.stage_names)}")
        self.fusion.begin_stage(self, stage)
        self._vision_key = None  # a stage may change the encoder: fingerprint it again
        names = set(self.fusion.trainable(self, stage))
        params = dict(self.named_parameters())
        unknown = names - params.keys()
        if unknown:
            raise FusionBenchError(f"strategy {self.fusion.registry_name!r} declares trainable parameters "
                                   f"that do not exist: {sorted(unknown)[:5]}")
        for n, p in params.items():
            p.requires_grad_(n in names)
        self.stage = stage

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def param_counts(self) -> dict[str, int]:
        seen, total, trainable = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return {"params_total": total, "params_trainable": trainable}

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts stay in eval mode (dropout off, BatchNorm statistics fixed), also inside an
        # LM or encoder that has trainable modules injected into it
        if mode:
            for module in (self.vision, self.lm):
                for sub in module.modules():
                    params = list(sub.parameters())
                    if params and not any(p.requires_grad for p in params):
                        sub.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------
    #: reuse features of a frozen encoder per image (``vision.feature_cache``; fusionbench.feature_cache)
    feature_cache: bool = True

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.vision.check_pixels(pixel_values)
        if any(p.requires_grad for p in self.vision.parameters()):
            return self.vision(pixel_values)
        if self.feature_cache and not self.vision.training:
            from fusionbench.feature_cache import CACHE, fingerprint

            if getattr(self, "_vision_key", None) is None:  # reset by set_stage (stages may change the encoder)
                self._vision_key = fingerprint(self.vision)
            return CACHE.features(self.vision, self._vision_key, pixel_values)
        with torch.no_grad():
            return self.vision(pixel_values)

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image embeddings spliced in at ``IMAGE_TOKEN_ID`` positions."""
        image_mask = input_ids == IMAGE_TOKEN_ID
        pad = self.tokenizer.pad_token_id or 0
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(image_mask, pad))
        n = self.num_image_tokens
        if features is None or n == 0:
            if image_mask.any():
                raise FusionBenchError("input has image placeholders but no image (or strategy uses none)")
            return embeds, image_mask
        per_row = image_mask.sum(1)
        if not bool((per_row == n).all()):
            raise FusionBenchError(f"each sequence needs exactly {n} image placeholders for strategy "
                                   f"{self.fusion.registry_name!r}, got {per_row.tolist()}")
        image_embeds = self.fusion.image_embeddings(features).to(embeds.dtype)
        expected = (input_ids.shape[0], n, embeds.shape[-1])
        if tuple(image_embeds.shape) != expected:  # masked_scatter would mix items or fail deep in torch
            raise FusionBenchError(
                f"strategy {self.fusion.registry_name!r}: image_embeddings returned shape {tuple(image_embeds.shape)}, "
                f"expected {expected} (batch, num_image_tokens, the LM's hidden size); its num_image_tokens "
                "must match the tokens it returns")
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds)
        return embeds, image_mask

    @contextlib.contextmanager
    def _lm_context(self, input_ids, attention_mask, pixel_values):
        """Yields LM keyword arguments for this input, with the strategy's state set. The inputs move
        to the model's device first: evaluation code builds its batches on the CPU, and a validation
        callback runs while Lightning holds the model on the accelerator."""
        device = self.lm.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        if pixel_values is None:
            if bool((input_ids == IMAGE_TOKEN_ID).any()):
                raise FusionBenchError("text-only input must not contain image placeholders")
            with self.fusion.text_only(self):
                yield {"input_ids": input_ids, "attention_mask": attention_mask}
            return
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise FusionBenchError(f"{pixel_values.shape[0]} images for {input_ids.shape[0]} sequences")
        features = self.encode_images(pixel_values)
        embeds, image_mask = self.embed(input_ids, features)
        kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        kwargs.update(self.fusion.lm_kwargs(self, features, attention_mask))
        with self.fusion.conditioning(self, features, image_mask):
            yield kwargs

    #: reuse the KV cache of a prompt prefix shared by a training batch (``trainer.cache_text_prefix``;
    #: only for strategies with ``frozen_text_prefix``)
    cache_text_prefix: bool = True

    @property
    def uses_text_prefix_cache(self) -> bool:
        """Whether training reuses a shared prompt prefix's KV cache: ``cache_text_prefix`` (off once
        the decoder blocks are compiled) and a strategy whose text before the image is frozen."""
        return bool(self.cache_text_prefix and self.fusion.frozen_text_prefix)

    def shared_prefix_length(self, input_ids, attention_mask, labels) -> int:
        """How many leading positions every sequence of the batch shares as the same unlabelled,
        unpadded text (no image placeholder) whose next token is unlabelled too: the part whose
        keys/values a strategy with ``frozen_text_prefix`` never changes. 0: none usable."""
        if not self.uses_text_prefix_cache or labels is None:
            return 0
        same = ((input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
                & (input_ids != IMAGE_TOKEN_ID).all(0) & (labels == IGNORE_INDEX).all(0))
        n = int(same.long().cumprod(0).sum())
        n = min(n - 1, input_ids.shape[1] - 2)  # the token after the prefix is not labelled; a suffix remains
        return max(n, 0)

    def _prefix_cache(self, prefix_ids: torch.Tensor, batch: int):
        """A fresh KV cache of ``prefix_ids [P]`` for ``batch`` rows: the prefix runs once through
        the strategy's text-only path (no gradient) and is kept until the prefix, device, dtype or
        autocast state changes."""
        dev = prefix_ids.device
        key = (tuple(prefix_ids.tolist()), str(dev), torch.is_autocast_enabled(dev.type),
               torch.get_autocast_dtype(dev.type), next(self.lm.parameters()).dtype)
        cached = getattr(self, "_prefix_kv", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                _, kv = text_hidden(self, prefix_ids[None], torch.ones_like(prefix_ids[None]), use_cache=True)
            cached = self._prefix_kv = (key, kv)
        cache = copy.deepcopy(cached[1])
        cache.batch_repeat_interleave(batch)
        return cache

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None) -> VLMOutput:
        """Training forward: LM loss on labelled positions only (the output layer runs only there).
        A prompt prefix shared by the batch (e.g. the system prompt) runs once and its KV cache is
        reused, for strategies whose text before the image never changes (``frozen_text_prefix``)."""
        p = self.shared_prefix_length(input_ids, attention_mask, labels) if pixel_values is not None else 0
        if p:
            cache = self._prefix_cache(input_ids[0, :p], input_ids.shape[0])
            with self._lm_context(input_ids[:, p:], attention_mask[:, p:], pixel_values) as kwargs:
                t = input_ids.shape[1] - p
                kwargs["attention_mask"] = attention_mask
                position_ids = torch.arange(p, p + t, device=input_ids.device).expand(input_ids.shape[0], t)
                decoder = self.lm.get_decoder()
                hidden = decoder(**kwargs, **{cache_kwarg(decoder): cache}, position_ids=position_ids,
                                 use_cache=True).last_hidden_state
            labels = labels[:, p:]
        else:
            with self._lm_context(input_ids, attention_mask, pixel_values) as kwargs:
                hidden = self.lm.get_decoder()(**kwargs, use_cache=False).last_hidden_state
        aux = self.fusion.aux_losses()
        if labels is None:
            return VLMOutput(loss=None, lm_loss=None, aux_losses=aux)
        shift_labels = labels[:, 1:]
        select = shift_labels != IGNORE_INDEX
        if not bool(select.any()):
            raise FusionBenchError("batch has no labelled tokens")
        logits = self._head(hidden[:, :-1][select])
        lm_loss = F.cross_entropy(logits.float(), shift_labels[select])
        loss = lm_loss + sum(aux.values()) if aux else lm_loss
        return VLMOutput(loss=loss, lm_loss=lm_loss, aux_losses=aux)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(self.lm, hidden)

    def logits(self, input_ids, attention_mask, pixel_values=None, positions=None) -> torch.Tensor:
        """Full-vocabulary logits ``[B, T, V]`` (evaluation); with a boolean ``positions [B, T]``
        only those rows, ``[N, V]`` (the output layer runs only there). Computed on the model's
        device, returned on ``input_ids``'s."""
        caller = input_ids.device
        with self._lm_context(input_ids, attention_mask, pixel_values) as kwargs:
            if positions is None:
                return self.lm(**kwargs, use_cache=False).logits.to(caller)
            hidden = self.lm.get_decoder()(**kwargs, use_cache=False).last_hidden_state
        return self._head(hidden[positions.to(hidden.device)]).to(caller)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens: int = 8, **gen) -> torch.Tensor:
        """Greedy generation (``input_ids`` left-padded); returns the new tokens only."""
        tok = self.tokenizer
        gen.setdefault("do_sample", False)
        gen.setdefault("pad_token_id", tok.pad_token_id)
        gen.setdefault("eos_token_id", tok.eos_token_id)
        with self._lm_context(input_ids, attention_mask, pixel_values) as kwargs:
            if "input_ids" in kwargs:  # text-only: embed ourselves so the output is new tokens only
                kwargs["inputs_embeds"] = self.lm.get_input_embeddings()(kwargs.pop("input_ids"))
            out = self.lm.generate(**kwargs, max_new_tokens=max_new_tokens, **gen)
        # the new tokens on the caller's device (a GenerateOutput, asked for with return_dict_in_generate, as it is)
        return out.to(input_ids.device) if isinstance(out, torch.Tensor) else out

    # -- checkpoints of the trainable part only --------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = set(self.trainable_parameter_names())
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict[str, Any]) -> None:
        self._vision_key = None
        own = self.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise FusionBenchError(f"checkpoint has parameters this model lacks: {unknown[:5]}")
        self.load_state_dict(state, strict=False)
