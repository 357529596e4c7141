from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("efficiency")
def efficiency(ctx: EvalContext) -> dict:
    """Parameters and FLOPs per text token / image / training step (``eval.efficiency``)."""
    e = ctx.cfg.eval
    if not e.efficiency:
        return {}
    from fusionbench.evaluation.efficiency import efficiency as measure

    val = ctx.data.val_ds
    n = min(e.efficiency_items, len(val))
    return measure(ctx.model, ctx.data.collator()([val[i] for i in range(n)]))
