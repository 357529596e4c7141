"""Injecting trainable layers into a backbone as PEFT's ``BaseTuner.inject_adapter`` does (our own
code): walk ``named_modules()``, replace each match with a wrapper that keeps it as ``base_layer``.

A strategy declares **what** to inject (:func:`inject_layers`) and **which rows** it touches
(:attr:`InjectedLayer.rows`, checked with hooks for every strategy by the contract tests). The base
class passes attributes through to ``base_layer``, its own parameters are the trainable ones
(:func:`injected_parameter_names`), and per-call state (image mask, visual features) comes from one
:class:`Conditioning` the strategy shares with its layers and sets for one LM call or ``generate()``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from fusionbench.errors import FusionBenchError

_MISSING = object()


class Conditioning:
    """Per-call state shared by every injected layer of one model (``image_mask``, ``latents``,
    ...), set by the strategy around one LM call and restored after. Unset keys read as None."""

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    def _changed(self) -> None:
        """Hook for subclasses that cache something derived from the state."""

    @contextlib.contextmanager
    def set(self, **values: Any) -> Iterator[None]:
        previous = {k: self._state.get(k, _MISSING) for k in values}
        self._state.update(values)
        try:
            self._changed()
            yield
        finally:
            for k, v in previous.items():
                if v is _MISSING:
                    self._state.pop(k, None)
                else:
                    self._state[k] = v
            self._changed()


class InjectedLayer(nn.Module):
    """A module injected in place of ``base_layer`` (kept, frozen, called for what it did before).
    Subclasses implement ``forward`` and set :attr:`rows`; everything else the LM asks of the
    original is answered by ``base_layer``."""

    #: ``"image"``: acts on image positions only (text positions: exactly ``base_layer``);
    #: ``"all"``: may change text positions while an image is present (e.g. Flamingo's gated
    #: cross-attention)
    rows: ClassVar[str] = "image"

    def __init__(self, base_layer: nn.Module, conditioning: Conditioning):
        super().__init__()
        self.base_layer = base_layer
        self.conditioning = conditioning  # a plain attribute (not a module): shared by every layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # weight, bias, layer_idx, attention_type, ...


def inject_layers(root: nn.Module, match: Callable[[str, nn.Module], bool],
                  factory: Callable[[str, nn.Module], nn.Module]) -> list[tuple[str, nn.Module]]:
    """Replace every module of ``root`` that ``match(name, module)`` selects with
    ``factory(name, module)``; ``(name, new module)`` in ``root.named_modules()`` order. Modules
    already injected, and modules inside them (their ``base_layer``), are never matched, so
    injecting twice changes nothing."""
    inside: set[str] = set()
    targets = []
    for name, module in root.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, InjectedLayer):
            inside.add(name)
            continue
        if match(name, module):
            targets.append((name, module))
            inside.add(name)
    out = []
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        new = factory(name, module)
        setattr(parent, attr, new)  # ModuleList / ModuleDict children are set by their key too
        out.append((name, new))
    return out


def injected(root: nn.Module) -> list[tuple[str, InjectedLayer]]:
    """Every :class:`InjectedLayer` under ``root`` (outermost only), with its name."""
    return [(n, m) for n, m in root.named_modules() if isinstance(m, InjectedLayer)]


def injected_parameter_names(root: nn.Module, prefix: str = "") -> set[str]:
    """Names (as ``root.named_parameters()`` spells them, with ``prefix``) of every parameter the
    injected layers under ``root`` add: the trainable set of an injecting strategy."""
    return {f"{prefix}{n}.{p}" for n, m in injected(root) for p, _ in m.named_parameters()
            if not p.startswith("base_layer.")}


class TokenRouting(Conditioning):
    """The conditioning shared by every :class:`ImageRowExpert` of one model: the image mask
    ``[B, T]`` of the current LM call (``image_mask``; None: no image, every token is text), with
    the row plan derived from it cached for the call."""

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[int, tuple[torch.Tensor, torch.Tensor, int] | None] = {}
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    def _changed(self) -> None:
        # the plan for the mask's own length is made here, when the strategy sets the mask before
        # the LM call: inside compiled decoder blocks its ``nonzero`` (a data-dependent shape)
        # would break every block's graph in two
        self._plans, self._sorted = {}, None
        mask = self.get("image_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # anything else: plan() says what is wrong
            self._plans[mask.shape[1]] = self._split(mask, mask.shape[1])

    def plan(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``(order, inverse, n_text)`` for ``x [B, T, D]``: flat row indices with text rows first
        and image rows after, the permutation back, and how many text rows; None when every row
        is text. Positions beyond the mask (cached generation: the new tokens) are text; a step
        shorter than the mask (a decode step after the prefill) is all text. Computed once per
        sequence length and shared by every projection of the LM call."""
        mask = self.get("image_mask")
        if mask is None:
            return None
        if x.dim() != 3 or x.shape[0] != mask.shape[0]:
            raise FusionBenchError(f"image-row expert: input of shape {list(x.shape)} does not match the image "
                                   f"mask of shape {list(mask.shape)} (expected [batch, seq, features])")
        t = x.shape[1]
        if t not in self._plans:
            self._plans[t] = self._split(mask, t)
        return self._plans[t]

    def sorted_rows(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``x``'s rows in ``order`` (text rows, then image rows), gathered once per input tensor:
        projections that read the same input (q/k/v, gate/up) share one gather, and its gradient
        is scattered back once."""
        if self._sorted is None or self._sorted[0] is not x:
            self._sorted = (x, x.reshape(-1, x.shape[-1]).index_select(0, order))
        return self._sorted[1]

    @staticmethod
    def _split(mask: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        tm = mask.shape[1]
        if t < tm:
            return None
        if t > tm:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], t - tm)], dim=1)
        flat = mask.reshape(-1).bool()
        image_rows = flat.nonzero().squeeze(1)
        if not image_rows.numel():
            return None
        text_rows = (~flat).nonzero().squeeze(1)
        order = torch.cat([text_rows, image_rows])
        return order, torch.argsort(order), text_rows.numel()


class ImageRowExpert(InjectedLayer):
    """A row-wise module (a projection, a norm: ``[B, T, D] -> [B, T, D']``, each row on its own)
    with a trainable copy, ``expert``, for image rows; text rows run ``base_layer``, the LM's frozen
    original. Each runs only on its own rows: the rows are gathered text-first (once per input,
    shared by modules that read the same input), each part goes through its module, one gather puts
    them back in place. Without an image mask it *is* ``base_layer``. CogVLM's visual expert
    (projections) and mPLUG-Owl2's modality-adaptive norms (norms) are this layer."""

    rows = "image"

    def __init__(self, base_layer: nn.Module, routing: TokenRouting):
        super().__init__(base_layer, routing)
        self.expert = copy.deepcopy(base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing: TokenRouting = self.conditioning
        plan = routing.plan(x)
        if plan is None:
            return self.base_layer(x)
        order, inverse, n_text = plan
        b, t, _ = x.shape
        rows = routing.sorted_rows(x, order)
        text_out = self.base_layer(rows[:n_text])
        image_out = self.expert(rows[n_text:])
        dtype = torch.promote_types(text_out.dtype, image_out.dtype)
        out = torch.cat([text_out.to(dtype), image_out.to(dtype)]).index_select(0, inverse)
        return out.reshape(b, t, -1)
