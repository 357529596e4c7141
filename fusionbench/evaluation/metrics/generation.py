from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("generation")
def generation(ctx: EvalContext) -> dict:
    """Secondary: exact match of generated answers on the first ``eval.mm_items`` test items, with
    majority and text-only baselines (fusionbench.evaluation.multimodal)."""
    e = ctx.cfg.eval
    if e.mm_items <= 0 or not len(ctx.short_test):
        return {}
    from fusionbench.evaluation.multimodal import evaluate_multimodal

    d = ctx.data
    return evaluate_multimodal(ctx.model, ctx.short_test, d.collator(with_answer=False),
                               d.collator(with_answer=False, with_image=False), ctx.majority,
                               e.mm_items, e.batch_size, e.max_new_tokens)
