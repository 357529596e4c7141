"""Caption metrics where the data has captions: the model is prompted with the image and a
captioning instruction, generates greedily, and the captions are scored against the dataset's
``caption`` column with pycocoevalcap's reference implementations (CIDEr-D as in the COCO caption
evaluation, BLEU-1..4, ROUGE-L), beside a text-only (no image) baseline of the same model.

The COCO server tokenises with the Stanford PTBTokenizer (Java); here text is normalised in
Python instead (:func:`normalise_caption`: lower case, punctuation removed, whitespace collapsed),
which for the ASCII captions of the procedural sources gives the same tokens.

CIDEr's IDF weights come from the references of the scored items, so ``cap/cider`` depends on the
set scored (and is 0 for a single item): compare it only at equal ``n_items`` on the same split.
Items are distinct images: rows that repeat an image (``questions_per_image > 1``) are scored once.
"""
from __future__ import annotations

import hashlib
import re
import string
from typing import Any, Sequence

import datasets
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from fusionbench.data.format import CAPTION_SYSTEM_PROMPT, encode
from fusionbench.data.sources.scene_captions import CAPTION_INSTRUCTION
from fusionbench.errors import FusionBenchError

#: system prompt of caption prompts (the question-answering prompt asks for a single word)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_caption(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed (the PTBTokenizer's job)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Corpus scores of ``predictions`` against ``references`` (one string or a list per item):
    ``bleu1``, ``bleu4`` (corpus BLEU, 0..1), ``cider`` (CIDEr-D, 0..10), ``rouge_l`` (0..1) and
    ``exact`` (share of normalised predictions equal to a normalised reference)."""
    if len(predictions) != len(references):
        raise FusionBenchError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        raise FusionBenchError("no captions to score")
    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise FusionBenchError(f"item {i} has no reference caption")
        gts[i] = [normalise_caption(r) for r in refs]
        res[i] = [normalise_caption(pred)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    # ROUGE-L's LCS table needs a token on each side; an empty prediction scores 0 there anyway
    rouge, _ = Rouge().compute_score(gts, {i: [h[0] or "\u2205"] for i, h in res.items()})
    exact = sum(res[i][0] in gts[i] for i in gts) / len(gts)
    return {"bleu1": float(bleu[0]), "bleu4": float(bleu[3]), "cider": float(cider),
            "rouge_l": float(rouge), "exact": float(exact)}


def caption_prompt_ids(tokenizer, num_image_tokens: int, has_image: bool = True,
                       instruction: str = CAPTION_INSTRUCTION,
                       system_prompt: str = CAPTION_SYSTEM_PROMPT) -> list[int]:
    """Token ids of the caption prompt, built by the training format (:func:`encode`) with the
    caption system prompt; the image becomes ``num_image_tokens`` placeholders."""
    return encode(tokenizer, instruction, None, num_image_tokens, has_image, system_prompt)[0]


def caption_items(dataset, n_items: int) -> tuple[list[Any], list[str]]:
    """The first ``n_items`` distinct images of ``dataset`` (decoded) and their captions."""
    if "caption" not in dataset.column_names:
        raise FusionBenchError(f"caption metrics need a 'caption' column; this dataset has {dataset.column_names}")
    raw = dataset
    if isinstance(dataset.features.get("image"), datasets.Image):
        raw = dataset.cast_column("image", datasets.Image(decode=False))
    keep, seen = [], set()
    for i in range(len(dataset)):
        if len(keep) >= n_items:
            break
        image = raw[i]["image"]
        blob = (image.get("bytes") or image.get("path")) if isinstance(image, dict) else None
        key = (hashlib.sha1(blob if isinstance(blob, bytes) else str(blob).encode()).hexdigest()
               if blob is not None else i, raw[i]["caption"])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if not keep:
        raise FusionBenchError("caption metrics: the dataset has no rows to score")
    subset = dataset.select(keep)
    return list(subset["image"]), list(subset["caption"])


@torch.no_grad()
def evaluate_captions(model, dataset, preprocess, n_items: int, batch_size: int, max_new_tokens: int,
                      text_only_baseline: bool = True, instruction: str = CAPTION_INSTRUCTION,
                      system_prompt: str = CAPTION_SYSTEM_PROMPT, return_records: bool = False):
    """Generate a caption for each of the first ``n_items`` distinct images of ``dataset`` and score
    them against its ``caption`` column. Returns ``cap/bleu1``, ``cap/bleu4``, ``cap/cider``,
    ``cap/rouge_l``, ``cap/exact``, the same with ``_text_only`` (the prompt without the image),
    and ``cap/n_items``; with ``return_records`` also the per-item records."""
    if n_items < 1 or batch_size < 1 or max_new_tokens < 1:
        raise FusionBenchError(f"caption metrics need n_items, batch_size and max_new_tokens >= 1, "
                               f"got {n_items}, {batch_size}, {max_new_tokens}")
    images, captions = caption_items(dataset, n_items)
    tok = model.tokenizer
    was_training = model.training
    model.eval()
    prompts = {has_image: caption_prompt_ids(tok, model.num_image_tokens, has_image, instruction, system_prompt)
               for has_image in ((True, False) if text_only_baseline else (True,))}
    generated: dict[bool, list[str]] = {k: [] for k in prompts}
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for has_image, ids in prompts.items():
                # one prompt for the whole batch: equal lengths, so left padding is a no-op
                input_ids = torch.tensor([ids] * len(chunk), dtype=torch.long)
                attention = torch.ones_like(input_ids)
                pixels = preprocess(chunk) if has_image else None
                out = model.generate(input_ids, attention, pixels, max_new_tokens=max_new_tokens)
                generated[has_image] += tok.batch_decode(out, skip_special_tokens=True)
    finally:
        model.train(was_training)
    metrics = {f"cap/{k}": v for k, v in score_captions(generated[True], captions).items()}
    if text_only_baseline:
        metrics.update({f"cap/{k}_text_only": v for k, v in score_captions(generated[False], captions).items()})
    metrics["cap/n_items"] = len(captions)
    if not return_records:
        return metrics
    records = [{"caption": c, "prediction": p, **({"prediction_text_only": generated[False][i]} if text_only_baseline else {})}
               for i, (c, p) in enumerate(zip(captions, generated[True]))]
    return metrics, records
