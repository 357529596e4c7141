"""The one interface every fusion strategy implements (``docs/adding_a_fusion.md`` walks through it).

A strategy decides (1) what it adds: modules beside the LM, built in ``__init__``, and/or modules
injected into it in :meth:`FusionStrategy.inject` (:mod:`fusionbench.fusion.inject`); (2) how images
reach the LM: embeddings spliced in at the image placeholder (:meth:`image_embeddings`), per-call
conditioning of the injected modules (:meth:`conditioning`, so ``generate()`` works), extra LM kwargs
(:meth:`lm_kwargs`); (3) what trains in each stage (:meth:`trainable`). Every strategy has an explicit
text-only mode (:meth:`text_only`), exactly the base LM where it promises a frozen text path (tested)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fusionbench.errors import FusionBenchError, did_you_mean, first_line
from fusionbench.fusion.inject import injected_parameter_names
from fusionbench.registry import Registry

if TYPE_CHECKING:
    from fusionbench.model import VisionLanguageModel

FUSIONS: Registry = Registry("fusion strategy", "fusionbench.fusion")


def register(name: str):
    """Class decorator: ``@register("mlp") class MLPProjector(FusionStrategy): ...``. Its ``Options``
    must be a ``@dataclass`` subclass of :class:`FusionOptions` (else the module is reported broken:
    on lookup and by ``fusionbench list``, before any config is read)."""
    def deco(cls):
        options = getattr(cls, "Options", None)
        if not (isinstance(options, type) and dataclasses.is_dataclass(options) and issubclass(options, FusionOptions)
                and "__dataclass_fields__" in vars(options)):
            raise TypeError(f"strategy {name!r} ({cls.__module__}.{cls.__name__}): Options must be a @dataclass "
                            f"subclass of FusionOptions, got {options!r}" + (
                                " (a subclass without its own @dataclass: its new fields are not options)"
                                if isinstance(options, type) and issubclass(options, FusionOptions) else ""))
        return FUSIONS.register(name)(cls)
    return deco


def ranged(default: float, low: float = 0, high: float | None = None, *, above: bool = False,
           below: bool = False) -> Any:
    """A numeric option with its range, checked with the config before anything is built:
    ``num_heads: int = ranged(4, low=1)``; ``above`` / ``below`` make an end exclusive;
    ``low=-math.inf`` for no lower end. A numeric option declared plainly need only be finite."""
    return dataclasses.field(default=default, metadata={"low": low, "high": high, "above": above, "below": below})


def _range_rule(meta: Any) -> tuple[Any, str]:
    if "low" not in meta:  # declared plainly
        return math.isfinite, "a finite number"
    low, high = meta["low"], meta.get("high")
    above, below = meta.get("above", False), meta.get("below", False)
    rule = ("a finite number" if low == -math.inf else f"> {low}" if above else f">= {low}") if high is None else \
        f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}"

    def ok(v: float) -> bool:
        return (math.isfinite(v) and (v > low if above else v >= low)
                and (high is None or (v < high if below else v <= high)))
    return ok, rule


def check_option_ranges(name: str, options_cls: type, merged: Any) -> None:
    """Every numeric option of a strategy within its declared range (:func:`ranged`; plain
    numeric options: finite): one error naming the option, the value and the range."""
    for f in dataclasses.fields(options_cls):
        value = merged.get(f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok, rule = _range_rule(f.metadata)
        if not ok(float(value)):
            raise FusionBenchError(f"fusion.{f.name}={value} is out of range for strategy {name!r}: it must be {rule}")


@dataclass
class FusionOptions:
    """Options every strategy has; subclasses add their own fields (validated from the config)."""

    name: str = ""
    #: text-only conditioning. False (default): text without an image takes the base LM's path.
    text_path_drift: bool = False


def fusion_options(node: Any) -> DictConfig:
    """Validate a ``fusion:`` config node against its strategy's ``Options`` dataclass."""
    if isinstance(node, str):
        node = {"name": node}
    name = node.get("name") if hasattr(node, "get") else None
    if not name:
        raise FusionBenchError("fusion config needs a 'name' (one of: " + ", ".join(FUSIONS.names()) + ")")
    cls = FUSIONS.get(str(name))
    schema = OmegaConf.structured(cls.Options)
    try:
        merged = OmegaConf.merge(schema, node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        hint = did_you_mean(key.split(".")[-1], fields, lambda c: f"'fusion.{c}'")
        if "not in struct" in str(e) or "Key '" in str(e):
            raise FusionBenchError(f"unknown option 'fusion.{key}' for strategy {name!r}.{hint} "
                                   f"Options: {', '.join(fields)}") from None
        raise FusionBenchError(f"invalid value for 'fusion.{key}' ({name}): {first_line(e)}") from None
    check_option_ranges(str(name), cls.Options, merged)
    if merged.get("text_path_drift") and not cls.HAS_TEXT_PATH_DRIFT:
        users = [n for n in FUSIONS.names() if getattr(FUSIONS.get(n), "HAS_TEXT_PATH_DRIFT", False)]
        raise FusionBenchError(f"fusion.text_path_drift=true does nothing for strategy {name!r}: only "
                               f"{', '.join(users) or 'no strategy'} has a text path to let drift")
    return merged


class FusionStrategy(nn.Module):
    """Base class. Subclasses set ``Options`` and override the hooks they need."""

    Options: ClassVar[type] = FusionOptions
    registry_name: ClassVar[str] = ""
    #: what the strategy does to the LM's text path, stated in each class's own body (a test checks
    #: it: never inherited silently). "frozen": text runs the frozen LM and no state of the strategy;
    #: "conditioned": text-only input is the base LM, but with an image text reads the strategy's
    #: state; "trained": LM weights change (the default: no promise). Options may refine it:
    #: override :meth:`text_invariant_for`.
    TEXT_PATH: ClassVar[str] = "trained"
    #: whether ``fusion.text_path_drift: true`` means something for this strategy (it is refused
    #: where it would be silently ignored)
    HAS_TEXT_PATH_DRIFT: ClassVar[bool] = False

    @classmethod
    def default_options(cls) -> DictConfig:
        """The strategy's options with every default (``fusion: {name: <it>}``)."""
        return fusion_options({"name": cls.registry_name})

    @classmethod
    def text_invariant_for(cls, options: Any) -> bool:
        """Does the LM's text path stay exactly the base LM's in text-only mode, with these options?
        (tested when True; recorded in every row as ``text_invariant``)"""
        return cls.TEXT_PATH != "trained"

    @classmethod
    def frozen_text_prefix_for(cls, options: Any) -> bool:
        """Are the text tokens before the first image token computed by frozen LM weights alone,
        with no state of this strategy (so their keys/values never change while it trains)? Then a
        training forward computes a prompt prefix shared by the whole batch once and reuses its KV
        cache (``trainer.cache_text_prefix``; tested equal to the uncached forward when True)."""
        return cls.TEXT_PATH == "frozen" and cls.text_invariant_for(options)

    @property
    def text_invariant(self) -> bool:
        """:meth:`text_invariant_for` this instance's validated options: the one answer tests,
        the prefix cache and the rows read."""
        return self.text_invariant_for(self.options)

    @property
    def frozen_text_prefix(self) -> bool:
        return self.frozen_text_prefix_for(self.options)

    def __init__(self, options: Any, lm_hidden_size: int, vision_dim: int, vision_tokens: int):
        super().__init__()
        self.options = options
        self.lm_hidden_size = lm_hidden_size
        self.vision_dim = vision_dim
        self.vision_tokens = vision_tokens

    def connector_width(self, heads_divide: str | None = None) -> int:
        """``fusion.hidden_size`` of a connector (0: min(LM hidden size, 256)); with
        ``heads_divide`` (what the width is of, for the message) ``fusion.num_heads`` must divide it."""
        o = self.options
        dim = o.hidden_size or min(self.lm_hidden_size, 256)
        if heads_divide and dim % o.num_heads:
            raise FusionBenchError(f"fusion.num_heads={o.num_heads} does not divide the {heads_divide} width {dim} "
                                   f"(fusion.hidden_size)")
        return dim

    # -- 1. what it adds ---------------------------------------------------------------------
    def inject(self, vlm: "VisionLanguageModel") -> None:
        """Modify the LM in place (after construction, before training). Default: nothing."""

    def validate(self, vlm: "VisionLanguageModel") -> None:
        """Raise :class:`FusionBenchError` for configurations that cannot work (before compute)."""

    # -- 2. how images reach the LM ------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """How many placeholder positions an image occupies in the LM input (0: none)."""
        return 0

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor | None:
        """Vision features ``[B, N, Dv]`` -> embeddings ``[B, num_image_tokens, D_lm]`` or None."""
        return None

    @contextlib.contextmanager
    def conditioning(self, vlm: "VisionLanguageModel", features: torch.Tensor,
                     image_mask: torch.Tensor) -> Iterator[None]:
        """State set on injected modules for one LM call (or one ``generate``). Default: none."""
        yield

    def lm_kwargs(self, vlm: "VisionLanguageModel", features: torch.Tensor | None,
                  attention_mask: torch.Tensor) -> dict[str, Any]:
        """Extra keyword arguments for the LM call (e.g. ``past_key_values``). Default: none."""
        return {}

    @contextlib.contextmanager
    def text_only(self, vlm: "VisionLanguageModel") -> Iterator[None]:
        """Context for text-only input (no image at all). Default: nothing to switch."""
        yield

    @contextlib.contextmanager
    def base_lm(self, vlm: "VisionLanguageModel") -> Iterator[None]:
        """Context in which ``vlm.logits(text)`` is exactly the base LM's, also after training
        (e.g. LoRA: ``disable_adapter()``). Default: :meth:`text_only` for text-invariant
        strategies; strategies that change LM weights in place cannot offer it."""
        if not self.text_invariant:
            raise FusionBenchError(f"strategy {self.registry_name!r} changes the LM's own weights; "
                                   "its base LM cannot be recovered in place")
        with self.text_only(vlm):
            yield

    # -- 3. what trains -------------------------------------------------------------------------
    #: stage names this strategy knows (``stages: [{name: ...}]`` in a config); "main" is the
    #: single stage of a config without ``stages``
    stage_names: ClassVar[tuple[str, ...]] = ("main",)

    def begin_stage(self, vlm: "VisionLanguageModel", stage: str | None) -> None:
        """Called when a stage starts, before its trainable set is applied (e.g. CuMo upcycles
        the dense connector trained in the previous stage into MoE experts). Default: nothing."""

    def trainable(self, vlm: "VisionLanguageModel", stage: str | None = None) -> set[str]:
        """Names (as in ``vlm.named_parameters()``) of the parameters that train in ``stage``.
        Default: every parameter the strategy owns and every parameter its injected layers add
        (:func:`~fusionbench.fusion.inject.injected_parameter_names`); the LM's and the vision
        encoder's own weights frozen."""
        return {f"fusion.{n}" for n, _ in self.named_parameters()} | injected_parameter_names(vlm)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward (e.g. MoE load balancing), already weighted."""
        return {}

    def extra_repr(self) -> str:
        return f"strategy={self.registry_name!r}"
