"""Golden numbers of every strategy on the tiny tier: a refactor must not change a computation.

For each strategy (``visual_expert`` on layers 0-2, so its layout is the one every version had):
build it with seed 0, train 2 AdamW steps on a fixed image batch, then record the loss, the
log-normaliser of the logits at every position and the full logits at the last position, with the
image and text-only. ``tests/test_golden.py`` recomputes them and compares (1e-5: other CPUs round
differently). After a *deliberate* change of a computation, regenerate and say so in the commit:

    .venv/bin/python -m tests.golden      # writes tests/data/golden_tiny.pt

The committed file was computed at 5a8a037 (before the shared injection layer) and reproduced bit
for bit after it (issue 15); ma_ln was added from its first version."""
from __future__ import annotations

from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "data" / "golden_tiny.pt"
SPECS = {"visual_expert": "{name: visual_expert, layers: [0, 1, 2]}"}


def compute(name: str) -> dict[str, torch.Tensor]:
    from tests.helpers import image_batch, text_batch, tiny_model, train_a_few_steps

    torch.manual_seed(0)
    model = tiny_model(SPECS.get(name, name))
    train_a_few_steps(model, steps=2, lr=1e-2)
    batch, _ = image_batch(model, n=4)
    with torch.no_grad():
        loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss
        logits = model.logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        ids, mask = text_batch(model)
        text = model.logits(ids, mask)
    return {"loss": loss, "lse": logits.logsumexp(-1), "last": logits[:, -1].clone(), "text_lse": text.logsumexp(-1),
            "text_last": text[:, -1].clone()}


def main() -> None:
    from fusionbench.fusion.base import FUSIONS

    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({name: compute(name) for name in FUSIONS.names()}, GOLDEN)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
