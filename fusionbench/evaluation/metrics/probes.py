from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("probes")
def probes(ctx: EvalContext) -> dict:
    """Per-layer depth probes (``eval.probes``; fusionbench.evaluation.probes)."""
    e = ctx.cfg.eval
    if not e.probes:
        return {}
    from fusionbench.evaluation.probes import depth_probes

    return depth_probes(ctx.model, n_train=e.probe_train, n_test=e.probe_test, seed=ctx.cfg.seed)
