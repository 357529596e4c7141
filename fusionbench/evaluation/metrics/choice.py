from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("choice")
def choice(ctx: EvalContext) -> dict:
    """Choice accuracy on the test split (primary), with the image controls when
    ``eval.controls`` (fusionbench.evaluation.choice); off with ``eval.choice: false``."""
    if not ctx.cfg.eval.choice or not len(ctx.short_test):
        return {}
    from fusionbench.evaluation.choice import evaluate_choice

    return evaluate_choice(ctx.model, ctx.short_test, ctx.prep.vision.preprocess, ctx.cfg.eval.batch_size,
                           seed=ctx.cfg.data.seed, controls=ctx.cfg.eval.controls)
