from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("text")
def text(ctx: EvalContext) -> dict:
    """The text suite on the trained model's text-only path beside the base LM's scores, token KL
    to the base LM, and forgetting as absolute changes with paired intervals (``eval.text_suite``)."""
    prep, cfg = ctx.prep, ctx.cfg
    if not prep.text_eval:
        return {}
    from fusionbench.runner import text_scores

    if cfg.eval.text.backend == "lm_eval":
        from fusionbench.evaluation.lm_eval_adapter import forgetting_lm_eval as forgetting
    else:
        from fusionbench.evaluation.text_suite import forgetting
    after = text_scores(cfg, ctx.model, prep.tokenizer, prep.suite, reference=prep.reference)
    return {**{f"base/{k}": v for k, v in prep.base_text.items()}, **after, **forgetting(prep.base_text, after)}
