"""Which text tasks can detect forgetting? Multiple-choice forgetting is only measurable on tasks
where the *base* LM is clearly above chance and above the position-bias baseline: a task at chance
has nothing to forget, and a model that prefers the first listed option turns any change of that
habit into "forgetting". This module scores the base LM on candidate BIG-bench tasks in each prompt
format (choices shuffled per item with a fixed seed, as BIG-bench does) and applies the stated rule:

    keep a (task, format) when n >= ``min_items``, acc >= chance + ``margin`` and acc > acc_first.

``fusionbench text-tasks`` writes one row per (task, format) with its numbers, CI and verdict, plus
provenance, to ``results/text_task_selection.jsonl``; the experiment configs then name the kept
tasks and format (``eval.text.tasks``, ``eval.text.format``).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from fusionbench.errors import AssetUnavailable, FusionBenchError

#: BIG-bench JSON multiple-choice tasks with >= 200 examples that a small LM might do above chance
CANDIDATES = ("hyperbaton", "intent_recognition", "movie_recommendation", "question_selection",
              "implicatures", "metaphor_boolean", "presuppositions_as_nli", "epistemic_reasoning",
              "timedial", "social_iqa", "sports_understanding", "date_understanding",
              "logical_fallacy_detection", "winowhy", "play_dialog_same_or_different",
              "general_knowledge", "phrase_relatedness")
#: BIG-bench JSON generative tasks (exact-match targets) a small LM might answer sometimes
GEN_CANDIDATES = ("qa_wikidata", "linguistic_mappings/plural_json", "linguistic_mappings/past_tense_json",
                  "linguistic_mappings/sentence_negation_json", "periodic_elements/subtask_1",
                  "object_counting", "word_unscrambling", "simple_arithmetic_json")
MIN_ITEMS, MARGIN = 200, 0.10


def score_candidates(lm, tokenizer, tasks: list[str], formats: list[str], n_items: int = MIN_ITEMS,
                     seed: int = 1234, batch_size: int = 16, margin: float = MARGIN,
                     log=print) -> list[dict[str, Any]]:
    """One row per (task, format): n, acc, acc_norm, acc_first, chance, the 95% bootstrap interval
    of acc - chance, and ``keep`` by the rule above (``why`` says which part failed)."""
    from omegaconf import OmegaConf

    from fusionbench.evaluation.text_suite import FORMATS, load_text_suite, score_text_suite
    from fusionbench.stats import bootstrap_diff

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise FusionBenchError(f"unknown text format(s) {unknown}; known: {', '.join(FORMATS)}")
    rows = []
    for task in tasks:
        for fmt in formats:
            cfg = OmegaConf.create({"tasks": [task], "n_per_task": n_items, "ppl_chunks": 0, "ppl_chunk_tokens": 128,
                                    "seed": seed, "format": fmt, "backend": "suite"})
            t0 = time.time()
            try:
                suite = load_text_suite(cfg)
            except (AssetUnavailable, FusionBenchError) as e:
                rows.append({"task": task, "format": fmt, "keep": False, "why": f"not loadable: {e}"})
                continue
            s = score_text_suite(suite, lm, tokenizer, batch_size=batch_size)
            items = [int(c) for c in s[f"text/{task}/items"]]
            n, acc, chance, first = len(items), s[f"text/{task}/acc"], s[f"text/{task}/chance"], s[f"text/{task}/acc_first"]
            ci = bootstrap_diff(np.array(items, dtype=float) - chance)
            why = [w for w, bad in ((f"n={n} < {MIN_ITEMS}", n < MIN_ITEMS),
                                    (f"acc {acc:.3f} < chance {chance:.3f} + {margin:.2f}", acc < chance + margin),
                                    (f"acc {acc:.3f} <= always-first {first:.3f}", acc <= first)) if bad]
            row = {"task": task, "format": fmt, "n": n, "acc": acc, "acc_norm": s[f"text/{task}/acc_norm"],
                   "acc_first": first, "chance": chance, "acc_minus_chance_ci_lo": ci["ci_lo"],
                   "acc_minus_chance_ci_hi": ci["ci_hi"], "keep": not why, "why": "; ".join(why),
                   "seconds": round(time.time() - t0, 1)}
            log(f"{task:32s} {fmt:9s} n={n:4d} acc={acc:.3f} first={first:.3f} chance={chance:.3f} "
                f"{'KEEP' if row['keep'] else 'drop: ' + row['why']}")
            rows.append(row)
    return rows


def score_generative_candidates(lm, tokenizer, tasks: list[str], formats: list[str], n_items: int = MIN_ITEMS,
                                seed: int = 1234, batch_size: int = 16, max_new_tokens: int = 12,
                                margin: float = MARGIN, log=print) -> list[dict[str, Any]]:
    """One row per generative (task, format): n and the base LM's exact match; ``keep`` when
    n >= ``MIN_ITEMS`` and exact match >= ``margin`` (there is something to forget)."""
    from fusionbench.evaluation.text_suite import GEN_FORMATS, TextSuite, load_generative, score_text_suite

    unknown = [f for f in formats if f not in GEN_FORMATS]
    if unknown:  # before any scoring: a mistyped format is not a task that failed to load
        raise FusionBenchError(f"unknown generative format(s) {unknown}; known: {', '.join(GEN_FORMATS)}")
    rows = []
    for task in tasks:
        for fmt in formats:
            t0 = time.time()
            try:
                gen = load_generative([task], n_items, seed, fmt)
            except (AssetUnavailable, FusionBenchError) as e:
                rows.append({"task": task, "format": fmt, "kind": "generative", "keep": False, "why": f"not loadable: {e}"})
                continue
            import datasets

            empty = datasets.Dataset.from_dict({"task": [], "item": [], "context": [], "continuation": [], "correct": []})
            s = score_text_suite(TextSuite(empty, [], [], generative=gen, gen_max_new_tokens=max_new_tokens),
                                 lm, tokenizer, batch_size=batch_size)
            n, em = len(gen), s[f"text/gen/{task}/em"]
            why = [w for w, bad in ((f"n={n} < {MIN_ITEMS}", n < MIN_ITEMS), (f"exact match {em:.3f} < {margin:.2f}", em < margin)) if bad]
            row = {"task": task, "format": fmt, "kind": "generative", "n": n, "em": em, "keep": not why,
                   "max_new_tokens": max_new_tokens,
                   "why": "; ".join(why), "seconds": round(time.time() - t0, 1)}
            log(f"{task:32s} {fmt:9s} n={n:4d} em={em:.3f} {'KEEP' if row['keep'] else 'drop: ' + row['why']}")
            rows.append(row)
    return rows
