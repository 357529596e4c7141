"""lm-evaluation-harness over the LM's text-only path: any fusion strategy, or the bare base LM.

* :class:`TextOnlyLM` is an lm-eval model (a subclass of ``lm_eval.api.model.LM``, as lm-eval's
  docs say to write a custom model). It wraps a :class:`~fusionbench.model.VisionLanguageModel`
  (scored in its strategy's **text-only mode**: no ``pixel_values``) or a bare HF causal LM and its
  tokenizer (the base score). ``loglikelihood`` / ``loglikelihood_rolling`` run the output layer
  only at the scored positions (``VisionLanguageModel.logits(..., positions=)`` /
  :func:`~fusionbench.model.lm_logits_at`); ``generate_until`` uses
  ``VisionLanguageModel.generate`` / the LM's ``generate`` on input embeddings, greedy, stopping at
  ``until`` and after ``max_gen_toks``. Both wrappers run the same code on the same requests in the
  same batches; only the function that maps a batch to logits differs, so a strategy that leaves
  the text path untouched gets bit-identical results (exactly zero forgetting).
* The offline default suite is lm-eval YAML task configs in ``lm_eval_tasks/`` (BIG-bench multiple
  choice from the ``bigbench==1.0.0`` sdist, rolling perplexity on Jane Austen's *Persuasion*).
  Any other BIG-bench multiple-choice task is offline too when named ``task:format`` (``format``:
  ``bigbench`` or ``plain``, as in ``eval.text.tasks``, e.g. ``movie_recommendation:plain``): its
  task config is generated from ``lm_eval_tasks/_bigbench_mc_template`` with the prompts the
  built-in suite (``eval.text.backend: suite``) writes, choices in the suite's per-item order. Which
  items ``limit`` scores is drawn per task here, by the suite across its task list: below a task's
  size the two backends score different items of it.
  :func:`prepare_local_tasks` writes their data once as JSONL into the fusionbench cache, with a
  copy of the YAMLs that points at it by absolute path, for ``TaskManager(include_path=...)``.
* :func:`score_with_lm_eval` runs ``lm_eval.simple_evaluate`` and returns flat
  ``text/<task>/<metric>`` scores. Any other lm-eval task name (hellaswag, arc_easy, ...) goes
  through the same function where the Hugging Face hub is reachable.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import os
import random
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from fusionbench.assets.paths import cache_dir
from fusionbench.errors import FusionBenchError, first_line

#: bump when the local tasks' data (item order, formatting, passages) change
LM_EVAL_SUITE_VERSION = "lm-eval-suite-v1"
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
#: the offline tasks: short name (the ``text/<name>/...`` key) -> lm-eval task name
LOCAL_TASKS = {
    "general_knowledge": "fusionbench_general_knowledge",
    "phrase_relatedness": "fusionbench_phrase_relatedness",
    "social_iqa": "fusionbench_social_iqa",
    "timedial": "fusionbench_timedial",
    "goal_step_wikihow/goal_inference": "fusionbench_goal_step_wikihow_goal_inference",
    "austen": "fusionbench_austen",
}
#: generated offline tasks (``task:format``) are named ``fusionbench_<task>_<format>``
GENERATED_PREFIX = "fusionbench_"
#: the default suite (SmolLM2-135M is clearly above chance on these two BIG-bench tasks)
DEFAULT_TASKS = ("general_knowledge", "phrase_relatedness", "austen")
#: held-out prose passages are paragraph-aligned and at least this many characters
AUSTEN_PASSAGE_CHARS = 1000

LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- the lm-eval model ---------------------------------------------------------------------------
class TextOnlyLM(LM):
    """An lm-eval model over the text-only path of a ``VisionLanguageModel`` (pass the model; its
    tokenizer is used unless one is given) or of a bare HF causal LM (pass it and its tokenizer).

    ``batch_size`` requests per forward pass, sorted longest first (deterministic: the same
    requests always form the same batches); ``max_length`` tokens of context at most (default: the
    LM's ``max_position_embeddings``, capped at 2048); ``max_gen_toks`` new tokens by default.
    """

    def __init__(self, model: nn.Module, tokenizer=None, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        from fusionbench.model import VisionLanguageModel, lm_logits_at

        if batch_size < 1:
            raise FusionBenchError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(model, VisionLanguageModel):
            vlm = model
            self.lm = vlm.lm
            self.tokenizer = tokenizer if tokenizer is not None else vlm.tokenizer
            self._logits: LogitsFn = lambda ids, mask, pos: vlm.logits(ids, mask, positions=pos)
            self._generate = vlm.generate
        else:
            if tokenizer is None:
                raise FusionBenchError("TextOnlyLM: a bare language model needs its tokenizer")
            lm = model
            self.lm = lm
            self.tokenizer = tokenizer
            self._logits = lambda ids, mask, pos: lm_logits_at(lm, ids, mask, pos)
            self._generate = functools.partial(_hf_generate, lm, tokenizer)
        self.model = model
        self.batch_size = int(batch_size)
        limit = getattr(self.lm.config.get_text_config(), "max_position_embeddings", None) or 2048
        self.max_length = int(max_length) if max_length else min(int(limit), 2048)
        self.max_gen_toks = int(max_gen_toks)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # lm-eval's HFLM convention: an empty context (and each rolling window's start) is BOS, else EOS
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self._device = next(model.parameters()).device

    # -- lm-eval API ------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            pairs.append(self._encode_pair(context, continuation))
        out = self._score(pairs)
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args[:2], answer)
        return out

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            tokens = self._encode(req.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._score(windows)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args[:1], total)
        return totals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one generate() configuration per group
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, idx in groups.items():
            kwargs = dict(requests[idx[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if not kwargs.get("do_sample", False) or kwargs.get("temperature", None) == 0.0:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}
                kwargs["do_sample"] = False
            keep = max(self.max_length - max_new, 1)
            encoded = {i: (self._encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in idx}
            order = sorted(idx, key=lambda i: (-len(encoded[i]), i))
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                ids, mask = _pad([encoded[i] for i in batch], self.pad_id, left=True)
                gen = dict(kwargs)
                if until:
                    gen.update(stop_strings=until, tokenizer=self.tokenizer)
                with self._eval_mode():
                    new = self._generate(ids.to(self._device), mask.to(self._device), max_new_tokens=max_new, **gen)
                for i, row in zip(batch, new.tolist()):
                    out[i] = self._decode_until(row, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i])
        return [s if s is not None else "" for s in out]

    # -- scoring ------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the
        continuation's tokens are those of ``context + continuation`` past the context's."""
        if context == "":
            return [self.prefix_token_id], self._encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation tokens), greedy?)`` per ``(context, continuation)`` token
        pair, in right-padded batches of the longest first; the output layer runs only at the
        positions that predict a continuation token."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), i))
        order = [i for i in order if pairs[i][1]]  # an empty continuation has log-likelihood 0
        for b in range(0, len(order), self.batch_size):
            batch = order[b:b + self.batch_size]
            seqs, spans = [], []
            for i in batch:
                ctx, cont = pairs[i]
                seq = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(seq[:-1])  # the last token predicts nothing that is scored
                spans.append((len(seq) - 1 - min(len(cont), len(seq) - 1), seq))
            ids, mask = _pad(seqs, self.pad_id)
            positions = torch.zeros_like(mask, dtype=torch.bool)
            targets = torch.zeros_like(ids)
            for r, (start, seq) in enumerate(spans):
                positions[r, start:len(seq) - 1] = True  # position t predicts token t + 1
                targets[r, start:len(seq) - 1] = torch.tensor(seq[start + 1:])
            with self._eval_mode():
                logits = self._logits(ids.to(self._device), mask.to(self._device), positions.to(self._device))
            logits = logits.float().cpu()
            target = targets[positions]
            logp = F.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0]
            greedy = logits.argmax(-1) == target
            counts = positions.sum(1).tolist()
            for i, lp, g in zip(batch, torch.split(logp, counts), torch.split(greedy, counts)):
                out[i] = (float(lp.double().sum()), bool(g.all()))
        return out

    def _decode_until(self, tokens: list[int], until: list[str]) -> str:
        stop_ids = {t for t in (self.tokenizer.eos_token_id, self.pad_id) if t is not None}
        for j, t in enumerate(tokens):
            if t in stop_ids:
                tokens = tokens[:j]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


def _pad(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(longest - len(s), longest) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def _hf_generate(lm: nn.Module, tok, input_ids, attention_mask, max_new_tokens: int = 8, **gen) -> torch.Tensor:
    """A bare LM's greedy generation, computed exactly as ``VisionLanguageModel.generate`` does in
    text-only mode (from input embeddings, so the output is the new tokens only)."""
    gen.setdefault("do_sample", False)
    gen.setdefault("pad_token_id", tok.pad_token_id)
    gen.setdefault("eos_token_id", tok.eos_token_id)
    embeds = lm.get_input_embeddings()(input_ids)
    return lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **gen)


# -- the offline task data -------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _bigbench_rows(name: str, seed: int, fmt: str | None = None) -> list[dict[str, Any]]:
    """The docs of a BIG-bench multiple-choice task in a seeded random order. ``fmt`` None: the
    legacy :data:`LOCAL_TASKS` layout (BIG-bench prompt, choices in the file's order); ``fmt``
    ``bigbench`` / ``plain``: the built-in suite's prompt in that format, each item's choices in
    the order the suite lists them for ``eval.text.seed`` = ``seed``."""
    from fusionbench.evaluation.text_suite import _bigbench_tasks, _format, choice_order_rng

    task = _bigbench_tasks([name])[name]
    examples = [e for e in task["examples"]
                if "target_scores" in e and any(bool(v) for v in e["target_scores"].values())]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows = []
    for item in rng.permutation(len(examples)).tolist():
        if fmt is None:
            context, conts, correct = _format(task, examples[item])
        else:  # the suite's per-item choice order
            context, conts, correct = _format(task, examples[item], choice_order_rng(seed, name, item), fmt)
        rows.append({"item": item, "context": context, "choices": [c[1:] for c in conts],
                     "gold": [j for j, ok in enumerate(correct) if ok]})
    return rows


def offline_task(task: str) -> tuple[str, str, str | None] | None:
    """``(short name, lm-eval task name, format)`` of an offline task, None for any other name
    (an lm-eval registry task). Offline: a :data:`LOCAL_TASKS` short name (format None: its
    YAML in ``lm_eval_tasks/``) or a BIG-bench task named ``task:format`` (a generated config)."""
    if task in LOCAL_TASKS:
        return task, LOCAL_TASKS[task], None
    if ":" not in task:
        return None
    from fusionbench.evaluation.text_suite import FORMATS, task_specs

    name, fmt = task_specs([task], "bigbench", FORMATS)[0]
    slug = "".join(c if c.isalnum() else "_" for c in name)
    return name, f"{GENERATED_PREFIX}{slug}_{fmt}", fmt


def _austen_rows(seed: int) -> list[dict[str, Any]]:
    from fusionbench.evaluation.text_suite import AUSTEN_HELD_OUT, austen_novels

    paragraphs, cur = [], []
    for line in austen_novels()[AUSTEN_HELD_OUT] + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    paragraphs = [p for p in paragraphs if not p.isupper()]  # drop chapter headings
    passages, cur = [], []
    for p in paragraphs:
        cur.append(p)
        if sum(len(x) + 1 for x in cur) > AUSTEN_PASSAGE_CHARS:
            passages.append("\n".join(cur))
            cur = []
    rng = np.random.default_rng([seed, zlib.crc32(b"austen")])
    return [{"item": i, "text": passages[i]} for i in rng.permutation(len(passages)).tolist()]


def prepare_local_tasks(tasks: list[str] | None = None, seed: int = 0) -> Path:
    """Write the data of the offline tasks (``tasks``: :data:`LOCAL_TASKS` short names or
    ``task:format`` BIG-bench tasks, see :func:`offline_task`; default all of :data:`LOCAL_TASKS`)
    once as JSONL into the fusionbench cache, and next to it a copy of ``lm_eval_tasks/`` whose
    ``data_files`` are absolute paths, plus a generated config per ``task:format``; returns that
    task folder (for ``lm_eval.tasks.TaskManager(include_path=...)``). Rows are in a seeded random
    order, so lm-eval's ``limit`` picks a fixed random subset."""
    names = list(LOCAL_TASKS) if tasks is None else list(tasks)
    specs = {t: offline_task(t) for t in names}
    unknown = [t for t, spec in specs.items() if spec is None]
    if unknown:
        raise FusionBenchError(f"unknown offline lm-eval task(s) {unknown}; known: {', '.join(LOCAL_TASKS)}, "
                               f"or any BIG-bench multiple-choice task as task:format (format bigbench or plain)")
    root = cache_dir("lm_eval", f"{LM_EVAL_SUITE_VERSION}-seed{seed}")
    data, out = root / "data", root / "tasks"
    data.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    hf_cache = cache_dir("lm_eval", "hf_datasets")
    from fusionbench.evaluation.text_suite import SUITE_VERSION

    for short, name, fmt in specs.values():
        # a generated task's docs follow the suite's prompts: its file changes with SUITE_VERSION
        target = data / (f"{name}.jsonl" if fmt is None else f"{name}.{SUITE_VERSION}.jsonl")
        if not target.exists():
            rows = _austen_rows(seed) if name == LOCAL_TASKS["austen"] else _bigbench_rows(short, seed, fmt)
            _atomic_write(target, "".join(json.dumps(r) + "\n" for r in rows))
        if fmt is not None:
            cfg = {"include": "_bigbench_mc_template", "task": name,
                   "dataset_kwargs": {"data_files": {"test": str(target)}, "cache_dir": str(hf_cache)}}
            text = f"# generated by fusionbench: BIG-bench {short!r} in the {fmt!r} format\n"
            _atomic_write(out / f"{name}.yaml", text + yaml.safe_dump(cfg, sort_keys=False))
    for src in TASKS_DIR.iterdir():
        if src.name.startswith("_"):
            _atomic_write(out / src.name, src.read_text())
            continue
        if src.suffix != ".yaml":
            continue
        cfg = yaml.safe_load(src.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {split: str(data / f) for split, f in files.items()}
        cfg["dataset_kwargs"]["cache_dir"] = str(hf_cache)
        text = f"# generated by fusionbench from {src.name}; edit that file, not this one\n"
        _atomic_write(out / src.name, text + yaml.safe_dump(cfg, sort_keys=False))
    return out


# -- scoring entry point -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool, generated: tuple[str, ...] = ()):
    """A TaskManager over ``include``; ``generated``: the generated task configs it must know (lm-eval
    indexes a folder once, and the generated folder gains configs as other task sets are scored)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=defaults)


@contextlib.contextmanager
def _keep_rng_state() -> Iterator[None]:
    """lm-eval seeds python / numpy / torch globally; the caller's streams (a training run's)
    continue afterwards as if it had not run."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _lm_eval_name(task: str) -> str:
    spec = offline_task(task)
    return spec[1] if spec else task


def score_with_lm_eval(model_or_lm: nn.Module, tokenizer=None, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                       limit: int | None = None, batch_size: int = 16, *, include_path: str | Path | None = None,
                       seed: int = 0, bootstrap_iters: int = 1000, max_gen_toks: int = 256) -> dict[str, float]:
    """Score ``model_or_lm``'s text-only path with ``lm_eval.simple_evaluate`` (zero-shot).

    ``model_or_lm``: a ``VisionLanguageModel`` (its strategy's text-only mode) or a bare HF causal
    LM with its ``tokenizer``. ``tasks``: offline short names (:data:`LOCAL_TASKS`), BIG-bench
    multiple-choice tasks as ``task:format`` (offline, :func:`offline_task`; scores under the bare
    task name, as the built-in suite's), names of tasks in ``include_path`` (a folder of lm-eval
    YAMLs), or any lm-eval task / group name (needs the Hugging Face hub). ``limit``: the first
    ``limit`` docs of each task (the offline tasks' docs are in a seeded random order). Returns, per task (offline tasks under their short name):
    ``text/<task>/<metric>`` (``acc``, ``acc_norm``, ``word_perplexity``, ``byte_perplexity``,
    ``bits_per_byte``, ...; a filter other than lm-eval's ``none`` is appended as
    ``<metric>_<filter>``), ``text/<task>/<metric>_stderr`` where lm-eval computes one (closed
    form for means such as ``acc``, bootstrap for the metrics lm-eval bootstraps),
    ``text/<task>/n`` (docs scored); and ``text/mc_avg`` / ``text/mc_avg_norm`` over the tasks
    (not groups) that report ``acc`` / ``acc_norm``.
    """
    import lm_eval

    tasks = list(tasks)
    if not tasks:
        raise FusionBenchError("score_with_lm_eval: no tasks given")
    if limit is not None and limit < 1:
        raise FusionBenchError(f"score_with_lm_eval: limit must be at least 1 (or None for all), got {limit}")
    specs = {t: offline_task(t) for t in tasks}
    local = [t for t, spec in specs.items() if spec is not None]
    shorts = [specs[t][0] if specs[t] else t for t in tasks]
    twice = sorted({n for n in shorts if shorts.count(n) > 1})
    if twice:
        raise FusionBenchError(f"score_with_lm_eval: task(s) {twice} named twice (their scores share one key): {tasks}")
    include = [str(prepare_local_tasks(local, seed=seed))] if local else []
    if include_path is not None:
        include.append(str(Path(include_path).resolve()))
    generated = tuple(sorted(specs[t][1] for t in local if specs[t][2] is not None))
    extra = _task_manager(tuple(include), False, generated) if include else None
    others = [t for t in tasks if specs[t] is None and (extra is None or t not in extra.all_tasks)]
    manager = _task_manager(tuple(include), bool(others), generated)
    if others:
        _check_hub_tasks(manager, others)
    lm = TextOnlyLM(model_or_lm, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)
    names = [_lm_eval_name(t) for t in tasks]
    with _keep_rng_state():
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                          bootstrap_iters=bootstrap_iters, log_samples=False,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    return flatten_results(results, {specs[t][1]: specs[t][0] for t in local})


def _check_hub_tasks(manager, names: list[str]) -> None:
    """Tasks that are not offline: one clear error when a name is unknown or its data needs the
    unreachable hub (lm-eval would fail deep inside ``datasets``)."""
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, list(LOCAL_TASKS) + manager.all_tasks, n=1) for t in unknown}
        said = ", ".join(f"{t!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for t, h in hints.items())
        raise FusionBenchError(f"unknown lm-eval task(s): {said}. Offline tasks: {', '.join(LOCAL_TASKS)}, or any "
                               f"BIG-bench multiple-choice task as task:format (format bigbench or plain)")
    try:
        manager.load(names)  # builds the tasks: downloads (or finds in the HF cache) their data
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many types for "no data"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = ("the Hugging Face hub is not reachable here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1) and their data "
               "is not in the local HF datasets cache") if offline else f"{type(e).__name__}: {first_line(e)}"
        raise FusionBenchError(
            f"cannot load lm-eval task(s) {names}: {why}. The offline tasks are: {', '.join(LOCAL_TASKS)} and any "
            f"BIG-bench multiple-choice task as task:format (format bigbench or plain); "
            f"or pass include_path= a folder of lm-eval YAML tasks over local files.") from None


def flatten_results(results: dict[str, Any], short: dict[str, str] | None = None) -> dict[str, float]:
    """``simple_evaluate``'s ``results`` -> ``{"text/<task>/<metric>": value}`` (see
    :func:`score_with_lm_eval`); ``short`` maps lm-eval task names to the names the keys use
    (default: :data:`LOCAL_TASKS` reversed)."""
    short = {**{v: k for k, v in LOCAL_TASKS.items()}, **(short or {})}
    scores: dict[str, float] = {}
    names = []
    groups = {short.get(g, g) for g, children in results.get("group_subtasks", {}).items() if children}
    for task, metrics in results["results"].items():
        name = short.get(task, task)
        names.append(name)
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if not flt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metric.endswith("_stderr")
            base = metric[:-len("_stderr")] if stderr else metric
            label = base if flt == "none" else f"{base}_{flt}"
            scores[f"text/{name}/{label}{'_stderr' if stderr else ''}"] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            scores[f"text/{name}/n"] = float(n)
    for metric, avg in (("acc", "text/mc_avg"), ("acc_norm", "text/mc_avg_norm")):
        vals = [scores[f"text/{n}/{metric}"] for n in names if f"text/{n}/{metric}" in scores and n not in groups]
        if vals:
            scores[avg] = sum(vals) / len(vals)
    return scores


def forgetting_lm_eval(base: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """:func:`fusionbench.evaluation.text_suite.forgetting` on lm-eval scores (multiple choice
    ``acc`` per task and averaged), plus ``forgetting/<task>/delta_bits_per_byte = after - base``
    for each rolling-perplexity task (positive: the LM got worse)."""
    from fusionbench.evaluation.text_suite import forgetting

    out = forgetting(base, after)
    for key in base:
        if key.startswith("text/") and key.endswith("/bits_per_byte") and key in after:
            task = key[len("text/"):-len("/bits_per_byte")]
            out[f"forgetting/{task}/delta_bits_per_byte"] = after[key] - base[key]
    return out
