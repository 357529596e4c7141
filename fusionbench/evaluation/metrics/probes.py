from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("probes")
def probes(ctx: EvalContext) -> dict:
    """Per-layer depth probes (``eval.probes``; fusionbench.evaluation.probes) of the trained model,
    beside the same probes of the untrained model (``probe/untrained/<fact>/layer_<i>``, measured
    before training by ``Prepared``) and, per fact, ``probe/<fact>/best``,
    ``probe/<fact>/best_untrained`` and ``probe/<fact>/gain_over_untrained`` (best layer each)."""
    e = ctx.cfg.eval
    if not e.probes:
        return {}
    from fusionbench.evaluation.probes import depth_probes, with_untrained

    out = depth_probes(ctx.model, n_train=e.probe_train, n_test=e.probe_test, seed=ctx.cfg.seed)
    return with_untrained(out, getattr(ctx.prep, "untrained_probes", {}) or {})
