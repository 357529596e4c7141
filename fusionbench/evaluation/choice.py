"""Choice scoring, the primary multimodal metric: each test item's candidate answers (its
template's answer set, ``choices``) ranked by their log-likelihood after the prompt; the item is
right when the gold answer ranks first. Beside it, with the same model and items, the image
controls: ``acc_shuffled`` (every item sees another item's image: a fixed derangement),
``acc_no_image`` (the strategy's text-only mode) and ``image_gain = acc - acc_shuffled`` with a
paired bootstrap 95% interval over items; ``chance`` is the mean of 1 / #candidates.

A candidate's log-likelihood is the sum of its tokens' log-probabilities (as the answer is
formatted for training, without the end-of-turn token): the first token's comes from the prompt's
last position (one forward of the prompts ranks every single-token candidate), longer candidates
get a second forward of prompt + candidate. Datasets without a ``choices`` column use the answers
of the item's question type seen in the test split (``mm/choice/candidates: per_qtype``; ``mixed``
when only some items have their own).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

import torch

from fusionbench.data.controls import derangement
from fusionbench.data.format import answer_ids, encode, system_prompt_for
from fusionbench.errors import FusionBenchError
from fusionbench.evaluation.text_suite import _pad
from fusionbench.stats import bootstrap_diff

CONDITIONS = ("image", "shuffled", "no_image")


def candidate_tokens(tokenizer, answer: str) -> list[int]:
    """The tokens of ``answer`` exactly as a training target writes it (end-of-turn excluded)."""
    ids = answer_ids(tokenizer, answer, eos=False)
    if not ids:
        raise FusionBenchError(f"candidate answer {answer!r} has no tokens")
    return ids


def item_choices(ds) -> tuple[list[list[str]], str]:
    """Per item its candidates and where they came from (``per_item``: the dataset's ``choices``;
    ``per_qtype``: every answer of the item's question type in ``ds``; ``mixed``: items with an
    empty ``choices`` list take their type's answers, the others their own)."""
    by_type: dict[str, set[str]] = defaultdict(set)
    for q, a in zip(ds["qtype"], ds["answer"]):
        by_type[q].add(a.strip())
    own = [list(c or []) for c in ds["choices"]] if "choices" in ds.column_names else [[] for _ in range(len(ds))]
    choices = [c or sorted(by_type[q]) for c, q in zip(own, ds["qtype"])]
    n_own = sum(bool(c) for c in own)
    source = "per_item" if n_own == len(own) else "per_qtype" if n_own == 0 else "mixed"
    for i, (c, gold) in enumerate(zip(choices, ds["answer"])):
        if len(set(c)) < 2:
            raise FusionBenchError(f"test item {i} ({ds[i]['question']!r}) has fewer than two candidate answers {c}")
        if gold.strip() not in c:
            raise FusionBenchError(f"test item {i}: gold answer {gold!r} is not among its candidates {c}")
    return choices, source


@torch.no_grad()
def choice_logprobs(model, questions: list[str], qtypes: list[str], choices: list[list[str]], images: list | None,
                    preprocess, batch_size: int) -> list[list[float]]:
    """Log-likelihood of every candidate of every item (``images`` None: text-only mode)."""
    tok = model.tokenizer
    has_image = images is not None
    n_img = model.num_image_tokens if has_image else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[list[float]] = []
    for b in range(0, len(questions), batch_size):
        qs, ts, cs = questions[b:b + batch_size], qtypes[b:b + batch_size], choices[b:b + batch_size]
        prompts = [encode(tok, q, None, n_img, has_image, system_prompt_for(t))[0] for q, t in zip(qs, ts)]
        cands = [[candidate_tokens(tok, c) for c in cc] for cc in cs]
        pix = preprocess(images[b:b + batch_size]) if has_image else None
        ids, mask = _pad(prompts, pad)
        last = torch.zeros_like(mask, dtype=torch.bool)
        for i, p in enumerate(prompts):
            last[i, len(p) - 1] = True
        first = model.logits(ids, mask, pix, positions=last).float().log_softmax(-1)  # [B, V] in row order
        scores = [[float(first[i, c[0]]) for c in cc] for i, cc in enumerate(cands)]
        longer = [(i, k) for i, cc in enumerate(cands) for k, c in enumerate(cc) if len(c) > 1]
        for s in range(0, len(longer), batch_size):
            part = longer[s:s + batch_size]
            seqs = [prompts[i] + cands[i][k] for i, k in part]
            ids2, mask2 = _pad(seqs, pad)
            pos = torch.zeros_like(mask2, dtype=torch.bool)
            for r, (i, k) in enumerate(part):  # positions predicting candidate tokens 2..n
                pos[r, len(prompts[i]):len(prompts[i]) + len(cands[i][k]) - 1] = True
            owner = torch.tensor([i for i, _ in part])
            logp = model.logits(ids2, mask2, pix[owner] if pix is not None else None, positions=pos)
            logp = logp.float().log_softmax(-1)
            targets = torch.tensor([t for i, k in part for t in cands[i][k][1:]])
            tok_lp = logp.gather(-1, targets[:, None])[:, 0]
            for (i, k), x in zip(part, torch.split(tok_lp, [len(cands[i][k]) - 1 for i, k in part])):
                scores[i][k] += float(x.sum())
        out += scores
    return out


def test_set_hash(ds, choices: list[list[str]]) -> str:
    """Fingerprint of the scored items (questions, answers, candidates, image bytes): rows are
    compared item by item only when it is equal."""
    h = hashlib.sha256()
    raw = ds.cast_column("image", type(ds.features["image"])(decode=False))["image"]
    for q, a, c, img in zip(ds["question"], ds["answer"], choices, raw):
        h.update(json.dumps([q, a, c]).encode())
        h.update(hashlib.sha256(img["bytes"] or b"").digest())
    return h.hexdigest()[:12]


def evaluate_choice(model, ds, preprocess, batch_size: int, seed: int = 0,
                    controls: bool = True) -> dict[str, Any]:
    """``mm/choice/...`` metrics of ``model`` on every item of ``ds`` (the test split): accuracy
    overall, per question type and per spatial relation; with ``controls`` also ``acc_shuffled``,
    ``acc_no_image``, ``image_gain`` (+ 95% bootstrap interval), per item ``items`` strings (1 =
    right) for paired comparisons, ``chance``, ``n``."""
    if len(ds) < 2:
        raise FusionBenchError(f"choice scoring needs at least 2 test items, got {len(ds)}")
    choices, source = item_choices(ds)
    questions, qtypes, answers = ds["question"], ds["qtype"], [a.strip() for a in ds["answer"]]
    relations = ds["relation"] if "relation" in ds.column_names else [""] * len(ds)
    images = ds["image"]
    was_training = model.training
    model.eval()
    try:
        conds = {"image": images}
        if controls:
            perm = derangement(len(ds), seed)
            conds["shuffled"] = [images[int(j)] for j in perm]
            conds["no_image"] = None
        correct: dict[str, list[int]] = {}
        for name, imgs in conds.items():
            lp = choice_logprobs(model, questions, qtypes, choices, imgs, preprocess, batch_size)
            correct[name] = [int(max(range(len(s)), key=s.__getitem__) == c.index(a))
                             for s, c, a in zip(lp, choices, answers)]
    finally:
        model.train(was_training)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (q, r) in enumerate(zip(qtypes, relations)):
        groups[""].append(i)
        groups[f"{q}/"].append(i)
        if r:
            groups[f"{q}/{r}/"].append(i)
    m: dict[str, Any] = {"mm/choice/n": len(ds), "mm/choice/candidates": source,
                         "mm/choice/test_hash": test_set_hash(ds, choices)}
    for g, idx in groups.items():
        key = f"mm/choice/{g}"
        m[f"{key}acc"] = sum(correct["image"][i] for i in idx) / len(idx)
        m[f"{key}chance"] = sum(1 / len(set(choices[i])) for i in idx) / len(idx)
        m[f"{key}n"] = len(idx)
        if g.count("/") > 1:  # per relation: accuracy and chance only
            continue
        m[f"{key}items"] = "".join(str(correct["image"][i]) for i in idx)
        if controls:
            m[f"{key}acc_shuffled"] = sum(correct["shuffled"][i] for i in idx) / len(idx)
            m[f"{key}acc_no_image"] = sum(correct["no_image"][i] for i in idx) / len(idx)
            gain = bootstrap_diff([correct["image"][i] for i in idx], [correct["shuffled"][i] for i in idx], seed=seed)
            m[f"{key}image_gain"] = gain["diff"]
            m[f"{key}image_gain_ci_lo"], m[f"{key}image_gain_ci_hi"] = gain["ci_lo"], gain["ci_hi"]
            m[f"{key}items_shuffled"] = "".join(str(correct["shuffled"][i]) for i in idx)
    return m
