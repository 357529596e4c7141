"""Prompt format and collation: chat template, image placeholders, labels masked on the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fusionbench.errors import FusionBenchError
from fusionbench.model import IGNORE_INDEX, IMAGE_TOKEN_ID

IMAGE_MARKER = "<image>"
SYSTEM_PROMPT = "Answer the question about the image with a single word."
#: caption rows (``qtype == "caption"``) are trained and evaluated under this one
CAPTION_SYSTEM_PROMPT = "Describe the image in one sentence."


def system_prompt_for(qtype: str | None) -> str:
    return CAPTION_SYSTEM_PROMPT if qtype == "caption" else SYSTEM_PROMPT


def _render(tokenizer, question: str, has_image: bool, system_prompt: str = SYSTEM_PROMPT) -> str:
    content = f"{IMAGE_MARKER}\n{question}" if has_image else question
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role
            messages = [{"role": "user", "content": f"{system_prompt}\n{content}"}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n{content}\nAnswer:"


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default: its BOS convention (``[bos]`` for
    Llama / Gemma tokenizers, nothing for GPT-2's or SmolLM2's). Prompts are tokenised piecewise
    (around the image placeholders) without special tokens, so this is added once, in front."""
    cached = getattr(tokenizer, "_fusionbench_bos_prefix", None)
    if cached is None:
        plain = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        n = len(full) - len(plain)
        cached = list(full[:n]) if n > 0 and list(full[n:]) == list(plain) else []
        try:
            tokenizer._fusionbench_bos_prefix = cached
        except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
            pass
    return list(cached)


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's :func:`bos_prefix` in front, unless they already start with it
    (a chat template that writes the BOS itself, as Gemma's does)."""
    prefix = bos_prefix(tokenizer)
    return ids if not prefix or list(ids[:len(prefix)]) == prefix else prefix + list(ids)


def encode(tokenizer, question: str, answer: str | None, num_image_tokens: int,
           has_image: bool = True, system_prompt: str = SYSTEM_PROMPT) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example; the image marker becomes ``num_image_tokens``
    ``IMAGE_TOKEN_ID`` placeholders (none for strategies that condition without tokens)."""
    text = _render(tokenizer, question, has_image, system_prompt)
    ids: list[int] = []
    parts = text.split(IMAGE_MARKER)
    for i, part in enumerate(parts):
        if i > 0:
            ids += [IMAGE_TOKEN_ID] * num_image_tokens
        ids += tokenizer(part, add_special_tokens=False).input_ids
    ids = with_bos(tokenizer, ids)
    labels = [IGNORE_INDEX] * len(ids)
    if answer is not None:
        target = answer_ids(tokenizer, answer)
        ids += target
        labels += target
    return ids, labels


def answer_ids(tokenizer, answer: str, eos: bool = True) -> list[int]:
    """An answer's tokens as :func:`encode` appends them to a prompt (``eos``: with the
    end-of-sequence token; choice scoring scores a candidate without it)."""
    ids = tokenizer(" " + answer.strip() if _needs_space(tokenizer) else answer.strip(),
                    add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id] if eos else ids


def _needs_space(tokenizer) -> bool:
    return not getattr(tokenizer, "chat_template", None)  # plain "Answer:" format


@dataclass
class Collator:
    """Batches dataset rows: tokenises, pads (right for training, left for generation), stacks
    preprocessed images. ``with_answer=False`` gives generation prompts plus the gold answers."""

    tokenizer: Any
    preprocess: Callable | None
    num_image_tokens: int
    max_length: int
    with_answer: bool = True
    with_image: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        seqs = [encode(self.tokenizer, r["question"], r["answer"] if self.with_answer else None,
                       self.num_image_tokens, self.with_image, system_prompt_for(r.get("qtype"))) for r in rows]
        longest = max(len(ids) for ids, _ in seqs)
        if longest > self.max_length:
            raise FusionBenchError(f"an example is {longest} tokens long, over trainer.max_length={self.max_length}")
        pad = self.tokenizer.pad_token_id
        left = not self.with_answer
        input_ids, attention, labels = [], [], []
        for ids, lab in seqs:
            n = longest - len(ids)
            if left:
                input_ids.append([pad] * n + ids); attention.append([0] * n + [1] * len(ids)); labels.append([IGNORE_INDEX] * n + lab)
            else:
                input_ids.append(ids + [pad] * n); attention.append([1] * len(ids) + [0] * n); labels.append(lab + [IGNORE_INDEX] * n)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }
        if self.with_answer:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["answers"] = [r["answer"] for r in rows]
            batch["qtypes"] = [r["qtype"] for r in rows]
            batch["relations"] = [r.get("relation", "") for r in rows]
        if self.with_image:
            batch["pixel_values"] = self.preprocess([r["image"] for r in rows])
        return batch


def check_lengths(tokenizer, dataset, num_image_tokens: int, max_length: int, name: str) -> int:
    """Fail before compute if any example is longer than ``max_length`` (with its answer, or with
    its longest choice candidate, which choice scoring appends in the answer's place); returns the
    longest."""
    longest, worst = 0, None
    candidates = dataset["choices"] if "choices" in dataset.column_names else None
    for i, (q, a, t) in enumerate(zip(dataset["question"], dataset["answer"], dataset["qtype"])):
        # encode(q, answer) is the prompt's tokens followed by answer_ids(answer)
        lengths = {str(c): len(answer_ids(tokenizer, str(c)))
                   for c in [a, *((candidates[i] or []) if candidates is not None else [])]}
        answer = max(lengths, key=lengths.get)
        n = len(encode(tokenizer, q, None, num_image_tokens, system_prompt=system_prompt_for(t))[0]) + lengths[answer]
        if n > longest:
            longest, worst = n, (q if answer == a else f"{q} ... {answer}")
    if longest > max_length:
        shown = worst if len(worst) <= 120 else f"{worst[:60]} ... {worst[-40:]} ({len(worst)} characters)"
        raise FusionBenchError(f"{name}: example {shown!r} is {longest} tokens with {num_image_tokens} image tokens "
                               f"and its answer (or longest choice candidate), over trainer.max_length={max_length}; "
                               "raise trainer.max_length or shorten the text")
    return longest
