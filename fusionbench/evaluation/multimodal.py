"""Multimodal accuracy: exact match of generated short answers, per question type and spatial
relation, beside a majority-answer baseline and a text-only (no image) baseline."""
from __future__ import annotations

import re
import string
from collections import Counter, defaultdict

import torch
from torch.utils.data import DataLoader

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalise(text: str) -> str:
    """Lower-case first word, punctuation stripped, number words as digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    if not words:
        return ""
    return _NUMBERS.get(words[0], words[0])


def majority_answers(dataset) -> dict[str, str]:
    """Most frequent training answer per short-answer question type (the baseline a blind guesser
    reaches); caption rows are scored by caption metrics instead."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for qtype, answer in zip(dataset["qtype"], dataset["answer"]):
        if qtype == "caption":
            continue
        by_type[qtype][normalise(answer)] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}


def _scores(records: list[dict], key: str) -> dict[str, float]:
    out: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        hit = r[key]
        out["mm/acc"].append(hit)
        out[f"mm/{r['qtype']}/acc"].append(hit)
        if r["relation"]:
            out[f"mm/{r['qtype']}/{r['relation']}/acc"].append(hit)
    suffix = {"correct": "", "majority": "_majority", "text_only": "_text_only"}[key]
    return {k.replace("/acc", f"/acc{suffix}"): sum(v) / len(v) for k, v in out.items()}


@torch.no_grad()
def evaluate_multimodal(model, dataset, collate_with_image, collate_text_only, majority: dict[str, str],
                        n_items: int, batch_size: int, max_new_tokens: int, text_only_baseline: bool = True,
                        return_records: bool = False):
    """Generate answers for the first ``n_items`` rows of ``dataset``; returns metric dict
    (``mm/acc``, ``mm/<qtype>/acc``, ``mm/spatial/<relation>/acc``, ``..._majority``, ``..._text_only``)."""
    subset = dataset.select(range(min(n_items, len(dataset))))
    was_training = model.training
    model.eval()
    tok = model.tokenizer
    records: list[dict] = []
    for batch in DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_with_image):
        out = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=max_new_tokens)
        for text, gold, qtype, rel in zip(tok.batch_decode(out, skip_special_tokens=True), batch["answers"],
                                          batch["qtypes"], batch["relations"]):
            g = normalise(gold)
            records.append({"prediction": text, "pred": normalise(text), "gold": g, "qtype": qtype, "relation": rel,
                            "correct": normalise(text) == g, "majority": majority.get(qtype) == g})
    if text_only_baseline:
        i = 0
        for batch in DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_text_only):
            out = model.generate(batch["input_ids"], batch["attention_mask"], None, max_new_tokens=max_new_tokens)
            for text in tok.batch_decode(out, skip_special_tokens=True):
                records[i]["text_only"] = normalise(text) == records[i]["gold"]
                i += 1
    model.train(was_training)
    metrics = {**_scores(records, "correct"), **_scores(records, "majority")}
    if text_only_baseline:
        metrics.update(_scores(records, "text_only"))
    metrics["mm/n_items"] = len(records)
    return (metrics, records) if return_records else metrics
