"""Lightning callbacks of fusionbench."""
from __future__ import annotations

import lightning as L
import torch

from fusionbench.evaluation.text_suite import TextSuite, forgetting, score_text_suite


class ForgettingCurve(L.Callback):
    """Scores a fixed slice of the text suite on the model's text-only path every
    ``every_n_steps`` optimizer steps (and at step 0, before any update), logs
    ``curve/<metric>`` to the Lightning loggers, and keeps the points for the results row:
    forgetting as it develops, not only at the end."""

    def __init__(self, suite: TextSuite, base: dict[str, float], tokenizer, every_n_steps: int, batch_size: int):
        self.suite, self.base, self.tokenizer = suite, base, tokenizer
        self.every, self.batch_size = every_n_steps, batch_size
        self.points: list[dict[str, float]] = []

    def _score(self, trainer, pl_module) -> None:
        model = pl_module.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            after = score_text_suite(self.suite, model, self.tokenizer,
                                     batch_size=self.batch_size)
        model.train(was_training)
        point = {"step": trainer.global_step, **after, **forgetting(self.base, after)}
        self.points.append(point)
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in point.items() if k != "step"}, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.points or self.points[-1]["step"] != step):
            self._score(trainer, pl_module)
