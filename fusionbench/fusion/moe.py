"""CuMo (Li et al., 2024, "CuMo: Scaling Multimodal LLM with Co-Upcycled Mixture-of-Experts"): the
MLP connector (and optionally the vision encoder's MLP blocks) become sparse top-k mixtures of
experts, each expert *upcycled* (Komatsuzaki et al., 2023, "Sparse Upcycling") from a trained dense
block, trained with a Switch load-balancing loss and an ST-MoE router z-loss. The LM is untouched.

Recipe (``stages:``), a faithful cut of CuMo's three stages that keeps the LM frozen:

* ``dense``    (CuMo pre-training): only the dense MLP connector trains; images go through it.
* ``unfreeze`` (CuMo pre-finetuning, which unfreezes the whole model): the dense connector keeps
  training, and with ``vision_moe`` so do the vision encoder's dense MLP blocks (the blocks that get
  upcycled next). The LM stays frozen, so text ability is exactly the base LM's: CuMo's LM-MLP MoE is
  not part of this strategy (the cost of unfreezing the LM is what ``full_finetune`` measures).
* ``upcycle``  (CuMo visual instruction tuning): on entering the stage every expert is set to a copy
  of its trained dense block (co-upcycling, once); experts and routers train with the aux losses.
* ``main``     (single-stage configs): upcycle directly from the dense initialisation (random, or
  ``init_from`` a dense ``mlp`` run; vision blocks: the pretrained encoder's own MLPs).

``moe_scratch`` is CuMo's ablation: the connector's experts start from independent random inits.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusionbench.errors import FusionBenchError, first_line
from fusionbench.fusion.base import ranged, register
from fusionbench.fusion.inject import inject_layers
from fusionbench.fusion.projector import MLPOptions, MLPProjector


class UpcycledMoE(nn.Module):
    """A dense block and its sparse top-k mixture-of-experts replacement.

    ``sparse=False``: ``dense(x)``. ``sparse=True``: a linear router, softmax, top-k with the kept
    weights renormalised to sum to 1; tokens are gathered per expert and each expert runs once on
    its own tokens (one batched call per expert, never per token); outputs are scattered back,
    weighted. With every expert equal to ``dense``, the output equals ``dense(x)``.
    """

    def __init__(self, dense: nn.Module | None, experts: list[nn.Module], dim: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise FusionBenchError(f"MoE top_k must be between 1 and the number of experts ({len(experts)}), got {top_k}")
        self.dense = dense
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(dim, len(experts), bias=False)
        self.top_k = top_k
        self.sparse = True
        #: experts currently hold a copy of ``dense`` that has not been retrained densely since
        self.upcycled = False
        #: ``(load_balance, router_z)`` of the last sparse forward, unweighted
        self.last_aux: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def upcycle(self) -> None:
        """Sparse upcycling: every expert becomes a copy of the (trained) dense block."""
        if self.dense is None:
            raise FusionBenchError("this MoE has no dense block to upcycle from (trained from scratch)")
        state = self.dense.state_dict()
        for expert in self.experts:
            expert.load_state_dict(state)
        self.upcycled = True

    def route(self, flat: torch.Tensor):
        """Router logits ``[N, E]`` (fp32), probabilities, top-k weights (renormalised) and indices."""
        logits = self.router(flat).float()
        probs = logits.softmax(dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return logits, probs, top_w / top_w.sum(dim=-1, keepdim=True), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            self.last_aux = None
            return self.dense(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        logits, probs, top_w, top_i = self.route(flat)
        out = None
        for e, expert in enumerate(self.experts):
            # every expert runs, on its (possibly empty) token set: its parameters always join the
            # graph (zero gradient when no token chose it), and an empty matmul costs nothing
            tokens, slot = (top_i == e).nonzero(as_tuple=True)
            y = expert(flat.index_select(0, tokens))
            y = y * top_w[tokens, slot].unsqueeze(-1).to(y.dtype)
            if out is None:
                out = y.new_zeros(flat.shape[0], y.shape[-1])
            out = out.index_add(0, tokens, y)
        # Switch Transformer load balancing: E * sum_e f_e * P_e (f: share of the N*k assignments,
        # P: mean router probability); 1.0 when routing is uniform. ST-MoE z-loss: mean logsumexp^2.
        share = F.one_hot(top_i, len(self.experts)).sum(dim=(0, 1)).float() / top_i.numel()
        balance = len(self.experts) * (share * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.last_aux = (balance, z)
        return out.reshape(*lead, -1)

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, top_k={self.top_k}, sparse={self.sparse}"


def _first_linear_in_features(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise FusionBenchError(f"cannot upcycle {type(block).__name__}: it has no nn.Linear to size a router from")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A trainable-only state dict (``vlm.trainable_state_dict()``) or a Lightning checkpoint of
    ours (both load with ``weights_only=True``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FusionBenchError(f"fusion.init_from: cannot read {path}: {first_line(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    if not isinstance(obj, dict):
        raise FusionBenchError(f"fusion.init_from: {path} holds no state dict")
    return obj


@dataclass
class MoEOptions(MLPOptions):
    num_experts: int = ranged(4, low=1)
    top_k: int = ranged(2, low=1)
    #: weight of the Switch load-balancing loss (1.0 for uniform routing)
    balance_coef: float = ranged(0.1)
    #: weight of the ST-MoE router z-loss
    z_coef: float = ranged(0.01)
    #: also upcycle the vision encoder's transformer MLP blocks into MoE blocks (ViT/CLIP/SigLIP)
    vision_moe: bool = False
    #: a dense ``mlp`` run's trainable-only state dict or Lightning checkpoint to read the dense
    #: connector from ("": its random initialisation)
    init_from: str = ""


@register("moe")
class MoEConnector(MLPProjector):
    """CuMo co-upcycled top-k MoE MLP connector (experts copied from a trained dense MLP), optional
    MoE vision MLP blocks; stages ``dense`` -> ``unfreeze`` -> ``upcycle`` (or one ``main``)."""

    Options = MoEOptions
    TEXT_PATH = "frozen"  # the experts act on image features only
    stage_names = ("main", "dense", "unfreeze", "upcycle")
    #: experts start as copies of the dense connector (False: independent random inits)
    upcycle_connector = True

    def __init__(self, options, lm_hidden_size, vision_dim, vision_tokens):
        super().__init__(options, lm_hidden_size, vision_dim, vision_tokens)
        self._vision_moes: list[tuple[str, UpcycledMoE]] = []  # plain list: owned by vlm.vision

    def build_projector(self) -> nn.Module:
        dense = super().build_projector()
        if self.upcycle_connector:
            experts = [copy.deepcopy(dense) for _ in range(self.options.num_experts)]
        else:
            experts = [super(MoEConnector, self).build_projector() for _ in range(self.options.num_experts)]
            dense = None
        return UpcycledMoE(dense, experts, self.vision_dim, self.options.top_k)

    # -- construction --------------------------------------------------------------------------
    def validate(self, vlm) -> None:
        if self.options.init_from:
            if not self.upcycle_connector:
                raise FusionBenchError(f"fusion.init_from is for 'moe'; {self.registry_name!r} trains its "
                                       "connector experts from random initialisation")
            if not Path(self.options.init_from).is_file():
                raise FusionBenchError(f"fusion.init_from: no such checkpoint file: {self.options.init_from}")
        if self.options.vision_moe:
            try:
                blocks = vlm.vision.mlp_blocks()
            except FusionBenchError as e:
                raise FusionBenchError(f"fusion.vision_moe=true needs a transformer vision encoder with MLP "
                                       f"blocks (e.g. vision.source=tiny_vit or a CLIP/SigLIP tower): {e}") from None
            for _, block in blocks:
                _first_linear_in_features(block)

    def inject(self, vlm) -> None:
        if self.options.init_from:
            self.load_dense(self.options.init_from)
        if not self.options.vision_moe:
            return
        blocks = {id(b) for _, b in vlm.vision.mlp_blocks() if not isinstance(b, UpcycledMoE)}
        n, k = self.options.num_experts, self.options.top_k
        inject_layers(vlm.vision, lambda name, m: id(m) in blocks, lambda name, m: UpcycledMoE(
            m, [copy.deepcopy(m) for _ in range(n)], _first_linear_in_features(m), k))
        self._vision_moes = [(f"vision.{n}", m) for n, m in vlm.vision.named_modules() if isinstance(m, UpcycledMoE)]

    def load_dense(self, path: str) -> None:
        """Dense connector weights from a dense ``mlp`` run (keys ``fusion.projector.{0,2}.*``) or
        from a ``moe`` run's dense connector (``fusion.projector.dense.*``)."""
        state = _read_state(Path(path))
        dense = self.projector.dense
        want = dense.state_dict()
        for prefix in ("fusion.projector.dense.", "fusion.projector."):
            found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in want}
            if found.keys() == want.keys():
                break
        else:
            raise FusionBenchError(f"fusion.init_from: {path} has no dense MLP connector "
                                   f"(expected keys fusion.projector.{{{', '.join(sorted(want))}}})")
        bad = [f"{k}: {list(v.shape)} vs {list(want[k].shape)}" for k, v in found.items() if v.shape != want[k].shape]
        if bad:
            raise FusionBenchError(f"fusion.init_from: connector shapes in {path} do not match this model "
                                   f"(checkpoint vs model): {'; '.join(bad)}")
        dense.load_state_dict(found)
        self.projector.upcycled = False

    # -- stages -----------------------------------------------------------------------------------
    def moe_modules(self) -> list[tuple[str, UpcycledMoE]]:
        """``(name in vlm.named_parameters() terms, module)`` of the connector and vision MoEs."""
        return [("fusion.projector", self.projector), *self._vision_moes]

    def begin_stage(self, vlm, stage) -> None:
        stage = stage or "main"
        for _, moe in self.moe_modules():
            if stage in ("dense", "unfreeze"):
                moe.sparse, moe.upcycled = False, False
                continue
            if moe.dense is not None and not moe.upcycled:
                moe.upcycle()  # co-upcycling: once per dense training, at the start of the sparse stage
            moe.sparse = True

    def trainable(self, vlm, stage=None) -> set[str]:
        """``dense``: the dense connector; ``unfreeze``: every dense block (connector and vision);
        sparse stages: every expert and router."""
        moes = self.moe_modules()
        if stage in ("dense", "unfreeze"):
            parts = [(f"{name}.dense", moe.dense) for name, moe in (moes[:1] if stage == "dense" else moes)]
        else:
            parts = [(f"{name}.{sub}", getattr(moe, sub)) for name, moe in moes for sub in ("experts", "router")]
        return {n for prefix, part in parts if part is not None for n, _ in part.named_parameters(prefix=prefix)}

    # -- losses -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def text_only(self, vlm):
        for _, moe in self.moe_modules():
            moe.last_aux = None  # no image, no routing: nothing stale may reach the loss
        yield

    def aux_losses(self) -> dict[str, torch.Tensor]:
        o = self.options
        out = {}
        if self.projector.last_aux is not None:
            balance, z = self.projector.last_aux
            out["load_balance"] = o.balance_coef * balance
            out["router_z"] = o.z_coef * z
        vision = [m.last_aux for _, m in self._vision_moes if m.last_aux is not None]
        if vision:
            out["vision_load_balance"] = o.balance_coef * torch.stack([b for b, _ in vision]).mean()
            out["vision_router_z"] = o.z_coef * torch.stack([z for _, z in vision]).mean()
        return out


@register("moe_scratch")
class MoEScratch(MoEConnector):
    """CuMo's ablation: the same top-k MoE connector with experts trained from independent random
    initialisations (no dense connector, one ``main`` stage). With ``vision_moe`` the vision experts
    are still upcycled from the pretrained encoder's MLP blocks (the ablation concerns the connector)."""

    TEXT_PATH = "frozen"
    stage_names = ("main",)
    upcycle_connector = False
