"""Evaluators: one registered function per metric family, picked (in order) by ``eval.metrics``.

An evaluator is ``fn(ctx: EvalContext) -> dict`` of namespaced metrics, registered with
``@register_evaluator("name")`` in one small file of ``fusionbench/evaluation/metrics/`` (the
heavy implementation beside it is imported only when the evaluator runs). ``runner.py`` only
orchestrates: it builds the context and merges what every listed evaluator returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusionbench.registry import Registry

#: name -> ``fn(ctx: EvalContext) -> dict[str, Any]``
EVALUATORS: Registry = Registry("evaluator", "fusionbench.evaluation.metrics")
register_evaluator = EVALUATORS.register


@dataclass
class EvalContext:
    """What an evaluator may read: the run's config, the prepared backbones / base-LM scores
    (``prep``: ``Prepared``), the trained model, its data module and the majority answers. The
    model sits on ``eval.device`` (a GPU after GPU training): build batches anywhere and call it
    through ``logits`` / ``generate`` / ``text_hidden`` (they move inputs to it), or move them."""
    cfg: Any
    prep: Any
    model: Any
    data: Any
    majority: dict[str, str]

    @property
    def short_test(self):
        """The test split's short-answer items (caption rows are scored by caption metrics)."""
        return self.data.short_test


def evaluate(ctx: EvalContext, names: list[str]) -> dict[str, Any]:
    """Every listed evaluator's metrics, merged in order, with the seconds each took
    (``eval_s/<name>``: where a point's evaluation time goes)."""
    import time

    metrics: dict[str, Any] = {}
    for name in names:
        t0 = time.time()
        metrics.update(EVALUATORS.get(name)(ctx))
        metrics[f"eval_s/{name}"] = round(time.time() - t0, 2)
    return metrics
