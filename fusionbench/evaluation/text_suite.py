"""The offline text suite: what multimodal training costs the LM's text ability.

* **Multiple choice**: BIG-bench tasks from the ``bigbench==1.0.0`` sdist, formatted as BIG-bench
  formats them (task prefix, ``"\\nQ: "`` input, ``"\\n  choice: ..."`` lines where the task
  appends choices, in an order shuffled per item with a fixed seed, as BIG-bench does; ``"\\nA: "``)
  and scored by the summed log-likelihood of each choice as the continuation; accuracy is the share
  of items whose best-scored choice is a correct one. Beside it: ``acc_first`` (always the first
  listed choice: the position-bias baseline), ``chance`` and ``items`` (per-item 0/1, for paired
  intervals of the accuracy change).
* **Perplexity and KL**: fixed chunks of public-domain prose (Jane Austen's *Persuasion*, from
  Debian ``r-cran-janeaustenr``; very likely in the LM's pretraining data, so it measures how well
  the LM keeps text it has seen, not generalisation), each tokenised with the LM's own BOS
  convention and scored whole: mean token negative log-likelihood -> ``log_ppl``; with a reference
  (the base LM) also the mean token ``KL(base || model)`` -> ``text/kl``. Per-chunk values travel
  with the scores, for paired intervals over chunks.

Items are drawn once per ``(TextEvalConfig)`` with its own seed, so the base LM and every trained
model are scored on exactly the same sequences in the same batches: a strategy that leaves the
text path untouched gets bit-identical scores and exactly zero forgetting.
"""
from __future__ import annotations

import gzip
import json
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from fusionbench.assets.debian import debian_package_dir
from fusionbench.assets.pypi import pypi_files, vendored_members
from fusionbench.data.format import with_bos
from fusionbench.errors import FusionBenchError

#: bump when item selection, formatting or scoring changes (base-LM score caches key on it)
SUITE_VERSION = "text-suite-v4"  # v4: shuffled choices, BOS, whole chunks, per-item/chunk values, KL
BIGBENCH = "bigbench==1.0.0"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_HELD_OUT = "persuasion"
#: task name -> chance accuracy is computed per item (1 / number of choices)
KNOWN_TASKS = ("general_knowledge", "phrase_relatedness", "social_iqa", "timedial",
               "goal_step_wikihow/goal_inference")

@dataclass
class TextSuite:
    #: one row per (item, choice): task, item, context, continuation, correct
    choices: datasets.Dataset
    #: held-out prose chunks (text), for perplexity
    prose: list[str]
    tasks: list[str]
    #: each prose chunk is scored on its first ``prose_tokens`` tokens
    prose_tokens: int = 128
    #: generative items ``(task, prompt, [targets])``: greedy generation, exact match
    generative: list[tuple[str, str, list[str]]] = field(default_factory=list)
    gen_max_new_tokens: int = 8

    def subset(self, items_per_task: int, prose_chunks: int) -> "TextSuite":
        """The first ``items_per_task`` items of each task and the first ``prose_chunks`` chunks (a
        cheap, fixed slice for evaluations during training)."""
        keep, seen = [], {}
        for i, (task, item) in enumerate(zip(self.choices["task"], self.choices["item"])):
            items = seen.setdefault(task, [])
            if item not in items and len(items) < items_per_task:
                items.append(item)
            if item in items:
                keep.append(i)
        gen, count = [], {}
        for item in self.generative:
            count[item[0]] = count.get(item[0], 0) + 1
            if count[item[0]] <= items_per_task:
                gen.append(item)
        return TextSuite(self.choices.select(keep), self.prose[:prose_chunks], self.tasks, self.prose_tokens,
                         gen, self.gen_max_new_tokens)


def task_glob(task: str) -> str:
    """The bigbench sdist member holding a JSON task (``name`` or ``name/subtask``)."""
    return f"*/bigbench/benchmark_tasks/{task}/task.json"


def shipped_tasks() -> list[str]:
    """The BIG-bench tasks fusionbench ships (``fusionbench/assets/vendored``): :func:`task_glob`'s
    members, back to task names."""
    return sorted(m.split("/benchmark_tasks/", 1)[1].removesuffix("/task.json") for m in vendored_members(BIGBENCH))


def _bigbench_json(tasks: list[str]) -> dict[str, dict]:
    """The JSON of each BIG-bench task (``name`` or ``name/subtask``), read from the sdist."""
    from fusionbench.errors import AssetUnavailable

    globs = {t: task_glob(t) for t in tasks}
    try:
        paths = pypi_files(BIGBENCH, list(globs.values()), sdist=True)
    except AssetUnavailable as e:
        if "no member matching" in str(e):
            raise FusionBenchError(f"{e} (only BIG-bench JSON tasks are supported)") from None
        shipped = shipped_tasks()
        missing = [t for t in tasks if t not in shipped]
        raise AssetUnavailable(f"BIG-bench task(s) {', '.join(missing)}: {e} Without the sdist, fusionbench has "
                               f"only the tasks it ships (fusionbench/assets/vendored): {', '.join(shipped)}") from None
    return {t: json.loads(paths[g].read_text()) for t, g in globs.items()}


#: shots in the ``fewshot`` generative format (BIG-bench scores its JSON tasks 0-, 1-, 2- and 3-shot)
GEN_SHOTS = 3
#: prompt formats of generative items: the multiple-choice formats (zero-shot) plus ``fewshot``
GEN_FORMATS = ("bigbench", "plain", "fewshot")


def load_generative(tasks: list[str], n_items: int, seed: int, fmt: str = "bigbench") -> list[tuple[str, str, list[str]]]:
    """``n_items`` items of each BIG-bench generative task (examples with ``target``), drawn with
    ``seed``, as ``(task, prompt, [targets])``. Formats: ``bigbench`` / ``plain`` as the
    multiple-choice suite writes them (zero-shot); ``fewshot``: BIG-bench's own k-shot layout
    (``task_prefix``, then :data:`GEN_SHOTS` solved examples with the task's input / output
    prefixes, then the item), the shots drawn with ``seed`` from examples that are not test items
    (the same shots for every item) and separated by a newline, so the answer is the first line."""
    if fmt not in GEN_FORMATS:
        raise FusionBenchError(f"generative text format must be one of {', '.join(GEN_FORMATS)}, got {fmt!r}")
    out = []
    rng = np.random.default_rng(seed + 7)
    for name, task in _bigbench_json(list(tasks)).items():
        examples = [e for e in task.get("examples", []) if e.get("target")]
        if not examples:
            raise FusionBenchError(f"BIG-bench task {name!r} has no generative examples (target)")
        order = rng.permutation(len(examples)).tolist()
        shots = ""
        if fmt == "fewshot":
            if len(examples) <= GEN_SHOTS:
                raise FusionBenchError(f"BIG-bench task {name!r} has {len(examples)} generative examples; "
                                       f"the fewshot format needs more than {GEN_SHOTS}")
            n_items = min(n_items, len(examples) - GEN_SHOTS)
            in_pre = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
            out_pre = task.get("example_output_prefix", "\nA: ") or " "
            for i in order[n_items:n_items + GEN_SHOTS]:
                e = examples[i]
                target = e["target"] if isinstance(e["target"], str) else e["target"][0]
                shots += in_pre + e["input"].strip() + out_pre + str(target).strip() + "\n"
        for i in sorted(order[:n_items]):
            e = examples[i]
            targets = e["target"] if isinstance(e["target"], list) else [e["target"]]
            if fmt == "plain":
                prompt = f"Question: {e['input'].strip()}\nAnswer:"
            elif fmt == "fewshot":
                prompt = (task.get("task_prefix", "") + shots + in_pre + e["input"].strip()
                          + (task.get("example_output_prefix", "\nA: ") or " ").rstrip(" "))
            else:
                prompt = (task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + e["input"]
                          + task.get("example_output_prefix", "\nA: ").rstrip(" "))
            out.append((name, prompt, [str(t) for t in targets]))
    return out


def normalise_answer(text: str) -> str:
    """The first line, stripped, lower-cased, without trailing punctuation (exact-match form)."""
    return text.strip().split("\n")[0].strip().lower().rstrip(".!?,;:").strip()


@torch.no_grad()
def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of ``prompts`` by a bare HF causal LM or a VisionLanguageModel's
    text-only path, through the same computation (left-padded ``inputs_embeds``; new tokens only)."""
    from fusionbench.model import VisionLanguageModel

    lm = model.lm if isinstance(model, VisionLanguageModel) else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for b in range(0, len(prompts), batch_size):
        seqs = [with_bos(tokenizer, tokenizer(p, add_special_tokens=False).input_ids) for p in prompts[b:b + batch_size]]
        longest = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (longest - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs])
        if isinstance(model, VisionLanguageModel):
            new = model.generate(ids, mask, None, max_new_tokens=max_new_tokens)
        else:
            embed = lm.get_input_embeddings()
            new = lm.generate(inputs_embeds=embed(ids.to(embed.weight.device)), attention_mask=mask.to(embed.weight.device),
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def _bigbench_tasks(tasks: list[str]) -> dict[str, dict]:
    """:func:`_bigbench_json` of multiple-choice tasks: a task without multiple-choice examples
    (``target_scores``) is one clear error."""
    out = _bigbench_json(tasks)
    for t, task in out.items():
        if not any("target_scores" in e for e in task.get("examples", [])):
            raise FusionBenchError(f"BIG-bench task {t!r} has no multiple-choice examples (target_scores)")
    return out


#: prompt formats of the multiple-choice items (``eval.text.format``): ``bigbench`` as BIG-bench
#: writes them (task prefix, ``Q:``, the choices listed where the task appends them, ``A:``);
#: ``plain`` a cloze prompt (``Question: ...`` / ``Answer:``) with the choices not listed
FORMATS = ("bigbench", "plain")


def _format(task: dict, example: dict, rng: np.random.Generator | None = None,
            fmt: str = "bigbench") -> tuple[str, list[str], list[bool]]:
    """One example in format ``fmt``; ``rng``: the order its choices are listed and scored in
    (None: the file's order, in which e.g. timedial always lists the gold answer last)."""
    targets = example["target_scores"]
    names = list(targets)
    if rng is not None:
        names = [names[i] for i in rng.permutation(len(names))]
    if fmt == "plain":
        prompt = f"Question: {example['input'].strip()}\nAnswer:"
    else:
        prompt = task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + example["input"]
        if task.get("append_choices_to_input", True):
            prompt += "".join(f"\n  choice: {c}" for c in names)
        prompt += task.get("example_output_prefix", "\nA: ").rstrip(" ")
    return prompt, [" " + c.strip() for c in names], [bool(targets[c]) for c in names]


def choice_order_rng(seed: int, task: str, item: int) -> np.random.Generator:
    """The generator of the order an item's choices are listed and scored in: one per (seed, task,
    item), so the order does not depend on which other items or tasks are drawn."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), item]))


def task_specs(tasks, default_format: str, formats: tuple[str, ...] = FORMATS) -> list[tuple[str, str]]:
    """``eval.text.tasks`` entries as ``(task, format)``: ``name`` (in ``eval.text.format``) or
    ``name:format`` (the format the task selection kept for it)."""
    out = []
    for t in tasks:
        name, _, fmt = str(t).partition(":")
        fmt = fmt or default_format
        if fmt not in formats:
            raise FusionBenchError(f"eval.text.tasks: {t!r} names format {fmt!r}; formats: {', '.join(formats)}")
        if not name.replace("/", "").replace("_", "").isalnum():
            raise FusionBenchError(f"eval.text.tasks: {t!r} is not a BIG-bench task name (e.g. {', '.join(KNOWN_TASKS[:2])})")
        out.append((name, fmt))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise FusionBenchError(f"eval.text.tasks names a task twice: {list(tasks)}")
    return out


def load_text_suite(cfg) -> TextSuite:
    """Draw the suite's items (``cfg.tasks``, ``cfg.n_per_task`` each) and prose chunks. ``cfg`` is
    the run's ``eval.text`` node or a :class:`~fusionbench.config.TextEvalConfig` (``fusionbench
    assets --prepare`` passes the schema's defaults)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    default_format = cfg.get("format", "bigbench")
    if default_format not in FORMATS:
        raise FusionBenchError(f"eval.text.format must be one of {', '.join(FORMATS)}, got {default_format!r}")
    specs = task_specs(cfg.tasks, default_format)
    if cfg.n_per_task < 1 and specs:
        raise FusionBenchError("eval.text.n_per_task must be at least 1")
    rows = []
    rng = np.random.default_rng(cfg.seed)
    loaded = _bigbench_tasks([n for n, _ in specs])
    for name, fmt in specs:
        task = loaded[name]
        examples = [e for e in task["examples"]
                    if "target_scores" in e and sum(bool(v) for v in e["target_scores"].values()) >= 1]
        pick = rng.permutation(len(examples))[: cfg.n_per_task]
        for item in sorted(pick.tolist()):
            context, conts, correct = _format(task, examples[item], choice_order_rng(cfg.seed, name, item), fmt)
            for cont, ok in zip(conts, correct):
                rows.append({"task": name, "item": item, "context": context, "continuation": cont, "correct": ok})
    choices = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"task": [], "item": [], "context": [], "continuation": [], "correct": []})
    prose = austen_chunks(cfg.ppl_chunks, cfg.ppl_chunk_tokens * 6, cfg.seed) if cfg.ppl_chunks else []
    generative = []
    for name, fmt in task_specs(cfg.get("gen_tasks") or [], default_format, GEN_FORMATS):
        generative += load_generative([name], int(cfg.get("gen_items", 50)), cfg.seed, fmt)
    return TextSuite(choices=choices, prose=prose, tasks=[n for n, _ in specs], prose_tokens=cfg.ppl_chunk_tokens,
                     generative=generative, gen_max_new_tokens=int(cfg.get("gen_max_new_tokens", 8)))


def austen_novels() -> dict[str, list[str]]:
    """The six novels as lists of lines, read from the R package's lazy-load database."""
    import rdata

    data = debian_package_dir(AUSTEN_PACKAGE) / "usr/lib/R/site-library/janeaustenr/data"
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (lazy-load entries are)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
            assert struct.unpack(">i", blob[int(offset):int(offset) + 4])[0] == len(raw)
            novels[str(name)] = [str(x) for x in rdata.conversion.convert(
                rdata.parser.parse_data(raw, expand_altrep=True))]
    return novels


def austen_chunks(n: int, chars: int, seed: int) -> list[str]:
    """``n`` paragraphs-aligned passages of about ``chars`` characters from the held-out novel."""
    lines = austen_novels()[AUSTEN_HELD_OUT]
    paragraphs, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    paragraphs = [p for p in paragraphs if len(p) > 200 and not p.isupper()]
    rng = np.random.default_rng(seed + 1)
    chunks = []
    for i in sorted(rng.permutation(len(paragraphs))[:n].tolist()):
        text = paragraphs[i]
        j = i + 1
        while len(text) < chars and j < len(paragraphs):
            text += "\n" + paragraphs[j]
            j += 1
        chunks.append(text[:chars])
    return chunks


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _decoder(model):
    """``(hidden_fn, head_fn)`` of a bare HF causal LM or of a VisionLanguageModel's text-only path."""
    from fusionbench.model import VisionLanguageModel, lm_head, text_hidden

    head = model._head if isinstance(model, VisionLanguageModel) else (lambda h: lm_head(model, h))
    return (lambda *a, **k: text_hidden(model, *a, **k)), head


@torch.no_grad()
def _target_logprobs(model, seqs: list[list[int]], starts: list[int], pad: int,
                     batch_size: int) -> list[float]:
    """Sum of log p(token) over ``seq[start:]`` for each whole sequence (right-padded batches); the
    output layer runs only at the scored positions. The reference computation (and the prose one)."""
    hidden_fn, head = _decoder(model)
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk, st = seqs[b:b + batch_size], starts[b:b + batch_size]
        ids, mask = _pad(chunk, pad)
        positions = torch.zeros_like(mask, dtype=torch.bool)  # position t predicts token t + 1
        for i, s in enumerate(chunk):
            positions[i, st[i] - 1:len(s) - 1] = True
        targets = ids[:, 1:][positions[:, :-1]]
        hidden, _ = hidden_fn(ids, mask)  # on the model's device (batches are built on the CPU)
        logp = F.log_softmax(head(hidden[positions.to(hidden.device)]).float(), dim=-1)
        tok = logp.gather(-1, targets.to(logp.device)[:, None])[:, 0]
        counts = positions.sum(1).tolist()
        out += [float(x.sum()) for x in torch.split(tok, counts)]
    return out


@torch.no_grad()
def _prose_kl(model, reference, seqs: list[list[int]], pad: int, batch_size: int,
              rows_per_slice: int = 512) -> list[float]:
    """Per sequence the mean over its scored tokens (all after the first) of
    ``KL(reference || model)`` between the next-token distributions; the output layers run on
    slices of ``rows_per_slice`` positions (a 49k vocabulary is 200 kB a row)."""
    hidden_m, head_m = _decoder(model)
    hidden_r, head_r = _decoder(reference)
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        ids, mask = _pad(chunk, pad)
        positions = torch.zeros_like(mask, dtype=torch.bool)
        for i, s in enumerate(chunk):
            positions[i, :len(s) - 1] = True
        hm, _ = hidden_m(ids, mask)
        hr, _ = hidden_r(ids, mask)
        hm, hr = hm[positions.to(hm.device)], hr[positions.to(hr.device)]
        kl = torch.empty(len(hm))
        for s0 in range(0, len(hm), rows_per_slice):
            lq = F.log_softmax(head_m(hm[s0:s0 + rows_per_slice]).float(), dim=-1)
            # the reference may sit on another device (the base LM stays on the CPU while the
            # forgetting curve scores the trained model on the accelerator)
            lp = F.log_softmax(head_r(hr[s0:s0 + rows_per_slice]).float(), dim=-1).to(lq.device)
            kl[s0:s0 + rows_per_slice] = (lp.exp() * (lp - lq)).sum(-1).cpu()
        out += [float(x.mean()) for x in torch.split(kl, positions.sum(1).tolist())]
    return out


@torch.no_grad()
def _choice_logprobs(model, items: list[tuple[list[int], list[list[int]]]], pad: int,
                     batch_size: int) -> list[list[float]]:
    """Summed log p(continuation | context) of every choice of every item ``(context ids,
    [continuation ids, ...])``, the context run once per item: a right-padded batch of contexts
    fills a KV cache, its rows are repeated per choice, and the choices run on top of it (position
    ids continuing each context's own length, context padding masked out). The same sums as
    :func:`_target_logprobs` on each ``context + continuation``, at ~1/k of the context compute
    for k choices (float rounding apart)."""
    hidden_fn, head = _decoder(model)
    out: list[list[float]] = []
    b = 0
    while b < len(items):
        e, rows = b, 0
        while e < len(items) and e - b < batch_size and (e == b or rows + len(items[e][1]) <= 4 * batch_size):
            rows += len(items[e][1])
            e += 1
        batch = items[b:e]
        b = e
        ctx_ids, ctx_mask = _pad([c for c, _ in batch], pad)
        ctx_len = torch.tensor([len(c) for c, _ in batch])
        hidden, cache = hidden_fn(ctx_ids, ctx_mask, use_cache=True)  # on the model's device
        dev = hidden.device
        owner = [i for i, (_, conts) in enumerate(batch) for _ in conts]
        conts = [t for _, ts in batch for t in ts]
        # the first token of each choice is predicted by its context's last position
        first = head(hidden[torch.arange(len(batch), device=dev), (ctx_len - 1).to(dev)]).float().log_softmax(-1)
        lp_first = first[torch.tensor(owner, device=dev), torch.tensor([t[0] for t in conts], device=dev)]
        lp = lp_first.tolist()
        if any(len(t) > 1 for t in conts):
            owner_t = torch.tensor(owner)
            cache.batch_select_indices(owner_t.to(dev))
            ids, mask = _pad(conts, pad)
            position_ids = ctx_len[owner_t, None] + torch.arange(ids.shape[1])
            hidden, _ = hidden_fn(ids, torch.cat([ctx_mask[owner_t], mask], dim=1), position_ids=position_ids,
                                  past_key_values=cache, use_cache=True)
            positions = torch.zeros_like(mask, dtype=torch.bool)
            for i, t in enumerate(conts):
                positions[i, :len(t) - 1] = True
            logp = head(hidden[positions.to(dev)]).float().log_softmax(-1)
            tok = logp.gather(-1, ids[:, 1:][positions[:, :-1]][:, None].to(dev))[:, 0]
            for i, x in enumerate(torch.split(tok, positions.sum(1).tolist())):
                lp[i] += float(x.sum())
        start = 0
        for _, ts in batch:
            out.append(lp[start:start + len(ts)])
            start += len(ts)
    return out


def score_text_suite(suite: TextSuite, model, tokenizer, batch_size: int = 16,
                     max_length: int = 512, reference=None) -> dict[str, float | str]:
    """Scores of one model on text-only input: a bare HF causal LM (the base) or a
    VisionLanguageModel's text-only path (the same computation either way):

    * ``text/<task>/acc``: the choice with the highest summed log-likelihood is correct;
      ``text/<task>/items``: the same per item (``"0110..."``, item order);
    * ``text/<task>/acc_norm``: the same with log-likelihood per character of the choice (lm-eval's
      ``acc_norm``; summed log-likelihood favours short choices);
    * ``text/<task>/acc_first`` (the first listed choice, a position-bias baseline) and
      ``text/<task>/chance`` (mean of #correct / #choices);
    * ``text/mc_avg`` / ``text/mc_avg_norm``: their means over tasks;
    * ``text/austen/log_ppl`` (mean token NLL over every scored token), ``text/austen/ppl``,
      ``text/austen/tokens`` and ``text/austen/chunk_nll`` (per-chunk mean NLL, JSON);
    * with ``reference`` (the base LM): ``text/kl``, the mean token KL(reference || model), and
      ``text/austen/chunk_kl`` (per chunk, JSON).

    Each item's context runs once for all its choices (:func:`_choice_logprobs`); a context that
    would not fit ``max_length`` with its longest choice is cut from the left.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[str, float | str] = {}
    if len(suite.choices):
        groups: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(zip(suite.choices["task"], suite.choices["item"])):
            groups.setdefault(key, []).append(i)
        contexts, continuations = suite.choices["context"], suite.choices["continuation"]
        items, order = [], []
        for key, idx in groups.items():
            ctx = {contexts[i] for i in idx}
            if len(ctx) != 1:
                raise FusionBenchError(f"text suite item {key} has choices with different contexts")
            conts = [tokenizer(continuations[i], add_special_tokens=False).input_ids for i in idx]
            if not all(conts):
                raise FusionBenchError(f"text suite item {key} has an empty choice")
            c = with_bos(tokenizer, tokenizer(contexts[idx[0]], add_special_tokens=False).input_ids)
            longest = max(len(t) for t in conts)
            c = c[-max(max_length - longest, 1):]
            if not c:
                raise FusionBenchError(f"text suite item {key} has an empty context")
            items.append((c, conts))
            order.append(idx)
        lls = [0.0] * len(suite.choices)
        for idx, values in zip(order, _choice_logprobs(model, items, pad, batch_size)):
            for i, v in zip(idx, values):
                lls[i] = v
        nchars = [len(c) for c in continuations]
        correct = suite.choices["correct"]
        for suffix, values in (("acc", lls), ("acc_norm", [ll / n for ll, n in zip(lls, nchars)])):
            best: dict[tuple[str, int], tuple[float, bool]] = {}
            for task, item, ok, v in zip(suite.choices["task"], suite.choices["item"], correct, values):
                if (task, item) not in best or v > best[(task, item)][0]:
                    best[(task, item)] = (v, ok)
            for task in suite.tasks:
                hits = [ok for (t, _), (_, ok) in best.items() if t == task]
                scores[f"text/{task}/{suffix}"] = sum(hits) / len(hits)
                if suffix == "acc":
                    scores[f"text/{task}/items"] = "".join(str(int(ok)) for (t, _), (_, ok) in best.items() if t == task)
            avg = "text/mc_avg" + ("_norm" if suffix == "acc_norm" else "")
            scores[avg] = sum(scores[f"text/{t}/{suffix}"] for t in suite.tasks) / len(suite.tasks)
        for task in suite.tasks:
            keys = [k for k in groups if k[0] == task]
            scores[f"text/{task}/acc_first"] = sum(bool(correct[groups[k][0]]) for k in keys) / len(keys)
            scores[f"text/{task}/chance"] = sum(sum(bool(correct[i]) for i in groups[k]) / len(groups[k])
                                                for k in keys) / len(keys)
    if suite.generative:
        texts = generate_text(model, tokenizer, [p for _, p, _ in suite.generative], suite.gen_max_new_tokens, batch_size)
        hits: dict[str, list[int]] = {}
        for (task, _, targets), text in zip(suite.generative, texts):
            hits.setdefault(task, []).append(int(normalise_answer(text) in {normalise_answer(t) for t in targets}))
        for task, h in hits.items():
            scores[f"text/gen/{task}/em"] = sum(h) / len(h)
            scores[f"text/gen/{task}/items"] = "".join(map(str, h))
    if suite.prose:
        # the LM's own convention: a BOS token where its tokenizer adds one (Llama, Gemma), none
        # where it does not (GPT-2, SmolLM2); the first token is context, every later one is scored
        seqs = [tokenizer(p).input_ids[:min(suite.prose_tokens, max_length)] for p in suite.prose]
        if any(len(s) < 2 for s in seqs):
            raise FusionBenchError("a prose chunk has fewer than 2 tokens")
        lls = _target_logprobs(model, seqs, [1] * len(seqs), pad, batch_size)
        n = [len(s) - 1 for s in seqs]
        log_ppl = -sum(lls) / sum(n)
        scores["text/austen/log_ppl"] = log_ppl
        scores["text/austen/ppl"] = math.exp(log_ppl)
        scores["text/austen/tokens"] = float(sum(n))
        scores["text/austen/chunk_nll"] = json.dumps([-ll / k for ll, k in zip(lls, n)])
        if reference is not None:
            kl = _prose_kl(model, reference, seqs, pad, batch_size)
            scores["text/kl"] = sum(k * c for k, c in zip(kl, n)) / sum(n)
            scores["text/austen/chunk_kl"] = json.dumps(kl)
            from fusionbench.stats import bootstrap_diff

            ci = bootstrap_diff(kl)
            scores["text/kl_ci_lo"], scores["text/kl_ci_hi"] = ci["ci_lo"], ci["ci_hi"]
    return scores


def forgetting(base: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Absolute changes from the base LM to the trained model, with paired 95% bootstrap intervals
    (over items, over prose chunks):

    * ``forgetting/<task>/acc_drop = base - after`` (accuracy points; positive: the LM got worse),
      ``..._ci_lo`` / ``..._ci_hi``; ``forgetting/mc_acc_drop``: their mean over tasks;
    * ``forgetting/austen/delta_log_ppl = after - base`` (nats per token; positive: worse),
      with its interval over chunks.

    (Rows before text-suite-v4 had ``forgetting/<task>`` and ``forgetting/mc_avg`` as relative
    changes ``(base - after) / base``.)"""
    from fusionbench.stats import bootstrap_diff

    out: dict[str, float] = {}
    tasks = [k[len("text/"):-len("/acc")] for k in base if k.startswith("text/") and k.endswith("/acc")]
    for t in tasks:
        key = f"forgetting/{t}/acc_drop"
        out[key] = base[f"text/{t}/acc"] - after[f"text/{t}/acc"]
        b, a = base.get(f"text/{t}/items"), after.get(f"text/{t}/items")
        if isinstance(b, str) and isinstance(a, str) and len(a) == len(b) and b:
            ci = bootstrap_diff([int(x) for x in b], [int(x) for x in a])
            out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = ci["ci_lo"], ci["ci_hi"]
    if tasks:
        out["forgetting/mc_acc_drop"] = sum(out[f"forgetting/{t}/acc_drop"] for t in tasks) / len(tasks)
    for key in [k for k in base if k.startswith("text/gen/") and k.endswith("/em") and k in after]:
        task = key[len("text/gen/"):-len("/em")]
        drop = f"forgetting/gen/{task}/em_drop"
        out[drop] = base[key] - after[key]
        b, a = base.get(f"text/gen/{task}/items"), after.get(f"text/gen/{task}/items")
        if isinstance(b, str) and isinstance(a, str) and len(a) == len(b) and b:
            ci = bootstrap_diff([int(x) for x in b], [int(x) for x in a])
            out[f"{drop}_ci_lo"], out[f"{drop}_ci_hi"] = ci["ci_lo"], ci["ci_hi"]
    if "text/austen/log_ppl" in base and "text/austen/log_ppl" in after:
        out["forgetting/austen/delta_log_ppl"] = after["text/austen/log_ppl"] - base["text/austen/log_ppl"]
        b, a = base.get("text/austen/chunk_nll"), after.get("text/austen/chunk_nll")
        if isinstance(b, str) and isinstance(a, str):
            b, a = json.loads(b), json.loads(a)
            if len(a) == len(b) and len(b) > 1:
                ci = bootstrap_diff(a, b)
                out["forgetting/austen/delta_log_ppl_ci_lo"] = ci["ci_lo"]
                out["forgetting/austen/delta_log_ppl_ci_hi"] = ci["ci_hi"]
    return out
