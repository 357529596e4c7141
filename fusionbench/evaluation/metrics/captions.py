from fusionbench.evaluation import EvalContext, register_evaluator


@register_evaluator("captions")
def captions(ctx: EvalContext) -> dict:
    """CIDEr / BLEU-4 / ROUGE-L of generated captions on the test split (``eval.captions``)."""
    e = ctx.cfg.eval
    if not e.captions:
        return {}
    from fusionbench.evaluation.captions import evaluate_captions

    return evaluate_captions(ctx.model, ctx.data.test_ds, ctx.prep.vision.preprocess, e.caption_items,
                             e.batch_size, e.caption_max_new_tokens)
