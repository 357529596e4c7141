"""The forgetting reference: an MLP projector with the whole LM unfrozen, as in PaLM-E (Driess et
al., 2023) and LLaVA's stage-2 instruction tuning (Liu et al., 2023). Every LM weight moves, so the
text path drifts and the base LM cannot be recovered in place (``text_invariant = False``)."""
from __future__ import annotations

from fusionbench.fusion.base import register
from fusionbench.fusion.projector import MLPProjector


@register("full_finetune")
class FullFinetune(MLPProjector):
    """LLaVA-1.5 MLP projector + every LM parameter trainable (tied embeddings count once);
    the vision encoder stays frozen."""
    TEXT_PATH = "trained"

    def trainable(self, vlm, stage=None) -> set[str]:
        return super().trainable(vlm, stage) | {n for n, _ in vlm.named_parameters() if n.startswith("lm.")}
