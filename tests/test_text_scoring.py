"""Multiple-choice scoring runs each context once for all its choices (a KV cache repeated per
choice): it must give the sums of scoring every ``context + choice`` as one sequence, for bare LMs
of every decoder family and for every strategy's text-only path, padding and all."""
import datasets
import pytest
import torch

from fusionbench.assets.lm import load_lm
from fusionbench.evaluation.text_suite import TextSuite, _choice_logprobs, _target_logprobs, score_text_suite
from fusionbench.fusion import FUSIONS
from helpers import tiny_cfg, tiny_model, train_a_few_steps

CONTEXTS = ["Q: what is 2 plus 2?\nA:", "Q: which of these words is a colour of the sky on a clear summer day?\nA:",
            "Pick one:"]
CHOICES = [[" 4", " five", " twenty-two"], [" blue", " green and rather pale grey", " x"], [" yes", " no"]]


def _items(tok):
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    return [(enc(c), [enc(t) for t in ts]) for c, ts in zip(CONTEXTS, CHOICES)]


def _reference(model, items, pad):
    seqs = [c + t for c, ts in items for t in ts]
    starts = [len(c) for c, ts in items for _ in ts]
    return _target_logprobs(model, seqs, starts, pad, batch_size=3)


def _check(model, tok):
    items = _items(tok)
    assert len({len(c) for c, _ in items}) == 3 and any(len(t) > 1 for _, ts in items for t in ts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ref = _reference(model, items, pad)
    for batch_size in (1, 2, 16):  # one item per batch, mixed, all at once (padding differs)
        got = [v for vs in _choice_logprobs(model, items, pad, batch_size) for v in vs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_shared_context_equals_whole_sequences_bare_lm(arch):
    cfg = tiny_cfg(f"lm.tiny.arch={arch}")
    lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    lm.eval()
    _check(lm, tok)


@pytest.mark.parametrize("strategy", FUSIONS.names())
def test_shared_context_equals_whole_sequences_text_only_path(strategy):
    """Every strategy's text-only path, after a few training steps (LoRA / full finetune /
    Flamingo-with-drift text paths differ from the base LM)."""
    model = tiny_model(strategy)
    train_a_few_steps(model)
    model.eval()
    _check(model, model.tokenizer)


def test_suite_scores_from_shared_contexts():
    """score_text_suite picks, per item, the choice the whole-sequence sums pick."""
    cfg = tiny_cfg()
    lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    lm.eval()
    rows = [{"task": "toy", "item": i, "context": c, "continuation": t, "correct": j == 0}
            for i, (c, ts) in enumerate(zip(CONTEXTS, CHOICES)) for j, t in enumerate(ts)]
    suite = TextSuite(choices=datasets.Dataset.from_list(rows), prose=[], tasks=["toy"])
    scores = score_text_suite(suite, lm, tok, batch_size=2)
    ref = _reference(lm, _items(tok), tok.pad_token_id)
    k, hits = 0, 0
    for ts in CHOICES:
        vals = ref[k:k + len(ts)]
        hits += max(range(len(ts)), key=vals.__getitem__) == 0
        k += len(ts)
    assert scores["text/toy/acc"] == hits / len(CHOICES)


def test_choices_are_shuffled_per_item_and_formats_differ():
    """BIG-bench shuffles the listed choices; in the file's order timedial lists the gold answer
    last, which made "always pick the last/first" a strategy. The order is fixed per (seed, item)."""
    import numpy as np

    from fusionbench.evaluation.text_suite import _format

    task = {"task_prefix": "", "examples": []}
    ex = {"input": "Pick the right one.", "target_scores": {"a": 0, "b": 0, "c": 1}}
    gold_at = {int(np.argmax(_format(task, ex, np.random.default_rng(i))[2])) for i in range(30)}
    assert gold_at == {0, 1, 2}
    assert _format(task, ex, np.random.default_rng(3))[0] == _format(task, ex, np.random.default_rng(3))[0]
    plain, conts, ok = _format(task, ex, None, "plain")
    assert plain == "Question: Pick the right one.\nAnswer:" and conts == [" a", " b", " c"] and ok == [False, False, True]
    assert "choice: a" in _format(task, ex, None, "bigbench")[0]


def test_suite_reports_position_bias_baseline_chance_and_char_normalised_acc():
    cfg = tiny_cfg()
    lm, tok = load_lm(cfg.lm, seed=0)
    rows = [{"task": "t", "item": i, "context": f"Q{i}:", "continuation": c, "correct": k == (i % 2)}
            for i in range(6) for k, c in enumerate([" aa", " b"])]
    suite = TextSuite(choices=datasets.Dataset.from_list(rows), prose=[], tasks=["t"])
    s = score_text_suite(suite, lm, tok, batch_size=4)
    assert s["text/t/acc_first"] == 0.5 and s["text/t/chance"] == 0.5  # gold first in items 0, 2, 4
    assert len(s["text/t/items"]) == 6 and s["text/t/items"].count("1") / 6 == s["text/t/acc"]


def test_task_selection_rule_and_bad_formats():
    from fusionbench.errors import FusionBenchError
    from fusionbench.evaluation.task_selection import score_candidates

    cfg = tiny_cfg()
    lm, tok = load_lm(cfg.lm, seed=0)
    rows = score_candidates(lm, tok, ["general_knowledge", "no_such_task_fb"], ["plain"], n_items=6,
                            log=lambda m: None)
    gk, missing = rows
    assert gk["n"] == 6 and not gk["keep"] and "n=6 < 200" in gk["why"]
    assert gk["acc_minus_chance_ci_lo"] <= gk["acc"] - gk["chance"] <= gk["acc_minus_chance_ci_hi"]
    assert not missing["keep"] and "not loadable" in missing["why"]
    with pytest.raises(FusionBenchError, match="unknown text format"):
        score_candidates(lm, tok, ["general_knowledge"], ["fancy"])
    # generative candidates too: a mistyped format is one error, not a 'not loadable' row per task
    from fusionbench.evaluation.task_selection import score_generative_candidates
    with pytest.raises(FusionBenchError, match="unknown generative format.*'fewshott'"):
        score_generative_candidates(lm, tok, ["qa_wikidata"], ["fewshott"])


@pytest.mark.parametrize("strategy", ["mlp", "full_finetune"])
def test_generative_task_exact_match_and_its_forgetting(strategy):
    """A generative text task (greedy generation, exact match): the base LM and a frozen-text
    strategy's text-only path generate the same tokens (em_drop exactly 0, every item); the
    normaliser compares first lines, case- and trailing-punctuation-insensitively."""
    from fusionbench.evaluation.text_suite import forgetting, generate_text, normalise_answer

    assert normalise_answer("  Paris.\nand more") == "paris" and normalise_answer("") == ""
    cfg = tiny_cfg(f"fusion={strategy}")
    base_lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    empty = datasets.Dataset.from_dict({"task": [], "item": [], "context": [], "continuation": [], "correct": []})
    prompts = ["Q: 2 + 2 =\nA:", "Q: the capital of France?\nA:", "Once upon a"]
    base_text = generate_text(base_lm, tok, prompts, 5, batch_size=2)
    gen = [("toy", p, [t]) for p, t in zip(prompts, [base_text[0], "nothing like it", base_text[2]])]
    suite = TextSuite(choices=empty, prose=[], tasks=[], generative=gen, gen_max_new_tokens=5)
    base = score_text_suite(suite, base_lm, tok, batch_size=2)
    assert base["text/gen/toy/items"] == "101" or normalise_answer(base_text[1]) == "nothing like it"
    model = tiny_model(strategy)
    train_a_few_steps(model, steps=5, lr=5e-2)
    after = score_text_suite(suite, model, tok, batch_size=2)
    fg = forgetting(base, after)
    assert fg["forgetting/gen/toy/em_drop"] == base["text/gen/toy/em"] - after["text/gen/toy/em"]
    if strategy == "mlp":
        assert generate_text(model, tok, prompts, 5, batch_size=2) == base_text and after == base


def test_task_specs_name_a_format_per_task():
    from fusionbench.errors import FusionBenchError
    from fusionbench.evaluation.text_suite import task_specs

    assert task_specs(["a_b", "c:plain", "d/e:bigbench"], "bigbench") == [("a_b", "bigbench"), ("c", "plain"),
                                                                          ("d/e", "bigbench")]
    with pytest.raises(FusionBenchError, match="format 'fancy'"):
        task_specs(["a:fancy"], "bigbench")
    with pytest.raises(FusionBenchError, match="twice"):
        task_specs(["a", "a:plain"], "bigbench")
    with pytest.raises(FusionBenchError, match="not a BIG-bench task name"):
        task_specs(["rm -rf"], "bigbench")


def test_fewshot_generative_format_shots_are_not_test_items():
    """``fewshot``: BIG-bench's k-shot layout; the shots are solved examples that are not among
    the items, the same shots precede every item, the items are the zero-shot formats' items,
    and a zero-shot-only format is refused for multiple-choice tasks."""
    from fusionbench.errors import FusionBenchError
    from fusionbench.evaluation.text_suite import GEN_SHOTS, load_generative, task_specs

    few = load_generative(["qa_wikidata"], 20, 3, "fewshot")
    zero = load_generative(["qa_wikidata"], 20, 3, "bigbench")
    assert len(few) == len(zero) == 20
    # same items (the query line of each fewshot prompt is the zero-shot item's input), same targets
    assert [t for _, _, t in few] == [t for _, _, t in zero]
    assert all(z[1].strip() .endswith(f[1].split("\n")[-1].strip()) for f, z in zip(few, zero))
    prefixes = {p[: p.rindex("\n")] for _, p, _ in few}
    assert len(prefixes) == 1                                     # one set of shots for every item
    shot_lines = next(iter(prefixes)).split("\n")
    assert len(shot_lines) == GEN_SHOTS
    queries = {p.split("\n")[-1].strip() for _, p, _ in few}
    assert not any(any(line.startswith(q) for q in queries) for line in shot_lines)
    with pytest.raises(FusionBenchError, match="format 'fewshot'"):
        task_specs(["qa_wikidata:fewshot"], "bigbench")          # multiple-choice formats only
    with pytest.raises(FusionBenchError, match="generative text format"):
        load_generative(["qa_wikidata"], 2, 3, "fancy")


@pytest.mark.parametrize("arch, expects_bos", [("gemma", True), ("llama", False), ("gpt2", False)])
def test_prompts_and_scored_contexts_follow_the_tokenizers_bos_convention(arch, expects_bos, monkeypatch):
    """Prompts (training, choice scoring, generation) and the text suite's contexts start with the
    tokenizer's BOS exactly when its tokenizer puts one before a text (the tiny Gemma's does, like
    Gemma's and Llama's; GPT-2-style and SmolLM2 tokenizers add none, so nothing changes there), and
    never twice."""
    from fusionbench.data.format import bos_prefix, encode, with_bos

    cfg = tiny_cfg(f"lm.tiny.arch={arch}")
    lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    assert bool(bos_prefix(tok)) == expects_bos
    ids, labels = encode(tok, "What color is it?", "red", 4)
    if expects_bos:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:  # nothing added (the ChatML prompt may itself start with the token the tokenizer calls BOS)
        assert with_bos(tok, [5, 6]) == [5, 6]
    assert len(ids) == len(labels)
    assert with_bos(tok, with_bos(tok, [5, 6])) == with_bos(tok, [5, 6])      # never twice
    suite = TextSuite(choices=datasets.Dataset.from_dict({"task": ["t", "t"], "item": [0, 0],
                                                          "context": ["Q: 2+2?\nA:"] * 2,
                                                          "continuation": [" 4", " 5"], "correct": [True, False]}),
                      prose=[], tasks=["t"])
    import fusionbench.evaluation.text_suite as ts

    seen, real = [], ts._choice_logprobs
    monkeypatch.setattr(ts, "_choice_logprobs", lambda model, items, *a, **k: (seen.extend(items), real(model, items, *a, **k))[1])
    score_text_suite(suite, lm, tok, batch_size=2)
    [(context, conts)] = seen
    plain = tok("Q: 2+2?\nA:", add_special_tokens=False).input_ids
    assert context == ([tok.bos_token_id] + plain if expects_bos else plain)


def test_assets_prepare_loads_the_text_suite_from_the_schema_defaults(monkeypatch, capsys):
    """``fusionbench assets --prepare`` builds the suite from a plain TextEvalConfig dataclass (not
    the run's omegaconf node); it once failed with "'TextEvalConfig' object has no attribute 'get'"."""
    from fusionbench.assets import catalog
    from fusionbench.config import TextEvalConfig
    from fusionbench.evaluation import text_suite

    seen = {}

    def fake_tasks(names):
        seen["tasks"] = list(names)
        return {n: {"examples": [{"input": f"{n} q{i}", "target_scores": {"yes": 1, "no": 0}} for i in range(60)]}
                for n in names}

    monkeypatch.setattr(text_suite, "_bigbench_tasks", fake_tasks)
    monkeypatch.setattr(text_suite, "austen_chunks", lambda n, chars, seed: ["prose"] * n)
    catalog.prepare(["text_suite"])
    assert seen["tasks"] == ["general_knowledge", "phrase_relatedness"]
    assert "done in" in capsys.readouterr().out
    cfg = TextEvalConfig()
    suite = text_suite.load_text_suite(cfg)
    assert len(suite.choices) == 2 * 50 * 2 and len(suite.prose) == cfg.ppl_chunks
