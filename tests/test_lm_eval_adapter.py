"""lm-evaluation-harness over the text-only path (tiny tier: random-init backbones, tasks written
into tmp_path; one integration test on the real default LM and the offline BIG-bench tasks)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from fusionbench.errors import FusionBenchError
from fusionbench.evaluation.lm_eval_adapter import TextOnlyLM, forgetting_lm_eval, score_with_lm_eval

from tests.helpers import tiny_cfg, tiny_model, train_a_few_steps

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

PROSE = ["It was a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife.",
         "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
         "never took up any book but the Baronetage.",
         "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition."]


def _write_tasks(folder):
    """A tiny multiple-choice task and a tiny rolling-perplexity task over local JSONL files."""
    mc = [{"context": f"Q: what is {i} plus one?\nA:", "choices": [str(i + 1), str(i + 2), str(i + 5)], "gold": [0]}
          for i in range(6)]
    (folder / "toy_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (folder / "toy_ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    common = {"dataset_path": "json", "test_split": "test", "num_fewshot": 0}
    hf = str(folder / "hf_datasets")
    tasks = {
        "toy_mc": {**common, "task": "toy_mc", "output_type": "multiple_choice",
                   "dataset_kwargs": {"data_files": {"test": str(folder / "toy_mc.jsonl")}, "cache_dir": hf},
                   "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "gold",
                   "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm")]},
        "toy_ppl": {**common, "task": "toy_ppl", "output_type": "loglikelihood_rolling",
                    "dataset_kwargs": {"data_files": {"test": str(folder / "toy_ppl.jsonl")}, "cache_dir": hf},
                    "doc_to_text": "", "doc_to_target": "text",
                    "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False}
                                    for m, a in (("word_perplexity", "weighted_perplexity"),
                                                 ("byte_perplexity", "weighted_perplexity"),
                                                 ("bits_per_byte", "bits_per_byte"))]},
    }
    for name, cfg in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_adapter_passes_lm_eval_simple_evaluate(task_dir):
    from lm_eval.tasks import TaskManager

    adapter = TextOnlyLM(tiny_model("mlp"), batch_size=4)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["toy_mc", "toy_ppl"],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  bootstrap_iters=100, log_samples=False)
    mc, ppl = out["results"]["toy_mc"], out["results"]["toy_ppl"]
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert isinstance(mc[key], float)
    assert 0.0 <= mc["acc,none"] <= 1.0 and mc["acc_stderr,none"] >= 0.0
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ppl[key] > 1.0 if "perplexity" in key else ppl[key] > 0.0
    assert out["n-samples"]["toy_mc"]["effective"] == 6 and out["n-samples"]["toy_ppl"]["effective"] == 3


def test_loglikelihood_matches_hand_computation():
    model = tiny_model("mlp")
    tok = model.tokenizer
    adapter = TextOnlyLM(model, batch_size=3)
    context, continuation = "The cat sat on", " the mat."
    ll, greedy = adapter.loglikelihood([_req("loglikelihood", context, continuation),
                                        _req("loglikelihood", "Hi", " there, how are you today?"),
                                        _req("loglikelihood", "", "Hello")])[0]
    ctx = tok(context, add_special_tokens=False).input_ids
    ids = torch.tensor([tok(context + continuation, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = F.log_softmax(model.logits(ids, torch.ones_like(ids))[0].float(), -1)
    hand = sum(float(logp[t - 1, ids[0, t]]) for t in range(len(ctx), ids.shape[1]))
    assert ll == pytest.approx(hand, abs=1e-4)
    assert greedy == all(int(logp[t - 1].argmax()) == int(ids[0, t]) for t in range(len(ctx), ids.shape[1]))
    # rolling: every token of the text, the first one conditioned on the prefix (BOS) token
    text = PROSE[1]
    seq = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = F.log_softmax(model.logits(seq, torch.ones_like(seq))[0].float(), -1)
    hand = sum(float(logp[t - 1, seq[0, t]]) for t in range(1, seq.shape[1]))
    assert adapter.loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0] == pytest.approx(hand, abs=1e-4)
    # windows of a short max length still predict every token exactly once
    short = TextOnlyLM(model, batch_size=3, max_length=16).loglikelihood_rolling([_req("loglikelihood_rolling", text)])[0]
    assert short < 0 and short != pytest.approx(hand, abs=1e-4)


def test_generate_until_stops_at_stop_string_and_max_gen_toks():
    model = tiny_model("mlp")
    tok = model.tokenizer
    letters = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    # the random-init LM's greedy text, restricted to letters so that it is readable
    kwargs = {"suppress_tokens": [i for i in range(len(tok)) if i not in letters]}
    adapter = TextOnlyLM(model, batch_size=2)
    new_tokens, generate = [], adapter._generate

    def counting(*args, **kw):
        out = generate(*args, **kw)
        new_tokens.append(out.shape[1])
        return out

    adapter._generate = counting
    prompt = "Q: what comes next?\nA:"
    free = adapter.generate_until([_req("generate_until", prompt, {**kwargs, "until": [], "max_gen_toks": 24})])[0]
    assert len(free) == 24 and new_tokens[-1] == 24
    stop = free[10:12]
    stopped = adapter.generate_until([_req("generate_until", prompt, {**kwargs, "until": [stop], "max_gen_toks": 24})])
    assert stopped == [free[:free.index(stop)]] and new_tokens[-1] <= 12  # generation itself stopped there
    batched = adapter.generate_until([  # a batch: each row is cut at its own first stop string
        _req("generate_until", prompt, {**kwargs, "until": [stop], "max_gen_toks": 24}),
        _req("generate_until", "Another, longer prompt here:", {**kwargs, "until": [stop], "max_gen_toks": 24})])
    assert batched[0] == stopped[0] and stop not in batched[1]
    assert len(adapter.generate_until([_req("generate_until", prompt, {**kwargs, "until": [], "max_gen_toks": 5})])[0]) == 5


@pytest.mark.parametrize("strategy", ["mlp", "full_finetune"])
def test_frozen_lm_strategy_scores_identical_to_base_lm(strategy, task_dir):
    """lm-eval on the bare base LM and on the trained model's text-only path: a frozen-LM
    strategy gives identical results (exactly zero forgetting); full finetune does not."""
    from fusionbench.assets.lm import load_lm

    cfg = tiny_cfg(f"fusion={strategy}")
    base_lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    tasks = ["toy_mc", "toy_ppl"]
    base = score_with_lm_eval(base_lm, tok, tasks, limit=5, batch_size=4, include_path=task_dir)
    model = tiny_model(strategy)
    train_a_few_steps(model)
    after = score_with_lm_eval(model, None, tasks, limit=5, batch_size=4, include_path=task_dir)
    assert base["text/toy_mc/n"] == 5 and base["text/toy_ppl/n"] == 3  # limit: the first 5 docs of each task
    assert {"text/toy_mc/acc", "text/toy_mc/acc_norm", "text/toy_mc/acc_stderr", "text/toy_ppl/word_perplexity",
            "text/toy_ppl/byte_perplexity", "text/toy_ppl/bits_per_byte", "text/mc_avg"} <= set(base)
    fg = forgetting_lm_eval(base, after)
    gen = [_req("generate_until", "Once upon a time", {"until": ["\n"], "max_gen_toks": 6}),
           _req("generate_until", "Q: 1 + 1?\nA:", {"until": ["\n"], "max_gen_toks": 6})]
    base_gen = TextOnlyLM(base_lm, tok, batch_size=2).generate_until(gen)
    after_gen = TextOnlyLM(model, batch_size=2).generate_until(gen)
    if strategy == "full_finetune":
        assert after["text/toy_ppl/bits_per_byte"] != base["text/toy_ppl/bits_per_byte"]
        assert fg["forgetting/toy_ppl/delta_bits_per_byte"] != 0.0
    else:
        assert after == base
        assert all(v == 0.0 for v in fg.values()) and "forgetting/toy_mc/acc_drop" in fg
        assert after_gen == base_gen


def test_bad_arguments_are_one_clear_error(task_dir):
    model = tiny_model("mlp")
    with pytest.raises(FusionBenchError, match="limit must be at least 1"):
        score_with_lm_eval(model, None, ["toy_mc"], limit=0, include_path=task_dir)
    with pytest.raises(FusionBenchError, match="needs its tokenizer"):
        TextOnlyLM(model.lm)


@pytest.mark.integration
def test_default_lm_above_chance_on_offline_bigbench_and_hub_task_is_clear_error():
    """SmolLM2-135M (the embedded default) on the offline lm-eval tasks: above chance on
    general_knowledge (chance ~0.14); a hub task here is one clear FusionBenchError."""
    from fusionbench.assets.lm import load_lm
    from fusionbench.config import LMConfig

    lm, tok = load_lm(LMConfig())
    scores = score_with_lm_eval(lm, tok, ["general_knowledge"], limit=30, batch_size=16)
    assert scores["text/general_knowledge/n"] == 30
    assert scores["text/general_knowledge/acc"] > 0.14 + 2 * scores["text/general_knowledge/acc_stderr"]
    prose = score_with_lm_eval(lm, tok, ["austen"], limit=3, batch_size=16)
    assert prose["text/austen/n"] == 3 and 1.5 < prose["text/austen/byte_perplexity"] < 4.0
    with pytest.raises(FusionBenchError, match="hub is not reachable"):
        score_with_lm_eval(lm, tok, ["hellaswag"], limit=2)
    with pytest.raises(FusionBenchError, match="did you mean 'hellaswag'"):
        score_with_lm_eval(lm, tok, ["hellaswagg"], limit=2)


def _fake_bigbench(names):
    """Two small BIG-bench-shaped multiple-choice tasks (stand-ins for the sdist's JSON)."""
    out = {}
    for n in names:
        out[n] = {"task_prefix": f"{n} task.\n", "examples": [
            {"input": f"Which number follows {i}?", "target_scores": {str(i + 1): 1, str(i + 3): 0, str(i + 7): 0}}
            for i in range(12)]}
    return out


def test_bigbench_task_with_a_format_is_an_offline_task_with_the_suites_prompts(tmp_path, monkeypatch):
    """``task:format`` (base.yaml's entries, e.g. movie_recommendation:plain) scores offline through
    lm-eval with the built-in suite's prompt in that format and its per-item choice order, keyed by
    the bare task name; it used to be sent to the hub registry ("unknown lm-eval task(s)")."""
    from fusionbench.assets.lm import load_lm
    from fusionbench.config import TextEvalConfig
    from fusionbench.evaluation import lm_eval_adapter, text_suite

    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(text_suite, "_bigbench_tasks", _fake_bigbench)
    assert lm_eval_adapter.offline_task("fake_a:plain") == ("fake_a", "fusionbench_fake_a_plain", "plain")
    assert lm_eval_adapter.offline_task("general_knowledge")[2] is None and lm_eval_adapter.offline_task("hellaswag") is None
    cfg = tiny_cfg("fusion=mlp")
    lm, tok = load_lm(cfg.lm, seed=cfg.seed)
    scores = score_with_lm_eval(lm, tok, ["fake_a:plain", "fake_b:bigbench"], limit=5, batch_size=4, seed=7)
    assert scores["text/fake_a/n"] == 5 and scores["text/fake_b/n"] == 5
    assert 0.0 <= scores["text/fake_a/acc"] <= 1.0 and "text/mc_avg" in scores
    data = tmp_path / "lm_eval" / f"{lm_eval_adapter.LM_EVAL_SUITE_VERSION}-seed7" / "data"
    rows = {n: [json.loads(line) for line in (data / f"fusionbench_{n}.{text_suite.SUITE_VERSION}.jsonl").read_text().splitlines()]
            for n in ("fake_a_plain", "fake_b_bigbench")}
    assert all(r["context"].startswith("Question: ") and "choice:" not in r["context"] for r in rows["fake_a_plain"])
    assert all("\n  choice: " in r["context"] for r in rows["fake_b_bigbench"])
    # the suite (same seed) lists each item's choices in the same order, with the same prompt
    suite = text_suite.load_text_suite(TextEvalConfig(tasks=["fake_a:plain"], n_per_task=12, ppl_chunks=0, seed=7))
    for r in rows["fake_a_plain"]:
        item = suite.choices.filter(lambda x: x["item"] == r["item"])
        assert item["context"][0] == r["context"]
        assert [c[1:] for c in item["continuation"]] == r["choices"]
        assert [j for j, ok in enumerate(item["correct"]) if ok] == r["gold"]
    # another task set in the same process: its generated config joins a folder lm-eval has indexed
    again = score_with_lm_eval(lm, tok, ["fake_c:plain"], limit=3, batch_size=4, seed=7)
    assert again["text/fake_c/n"] == 3
    with pytest.raises(FusionBenchError, match="named twice"):
        score_with_lm_eval(lm, tok, ["fake_a:plain", "fake_a:bigbench"], limit=2)
    with pytest.raises(FusionBenchError, match="names format 'cloze'"):
        score_with_lm_eval(lm, tok, ["fake_a:cloze"], limit=2)


def test_lm_eval_backend_configs_score_offline_and_refuse_gen_tasks():
    """Every experiment with eval.text.backend=lm_eval names only offline tasks here (no hub), and
    generative tasks with that backend are one clear config error (they would be silently dropped)."""
    from pathlib import Path

    from fusionbench.config import expand_grid, load_config
    from fusionbench.evaluation.lm_eval_adapter import offline_task

    root = Path(__file__).resolve().parents[1]
    found = 0
    for path in sorted((root / "experiments").rglob("*.yaml")):
        if "backend: lm_eval" not in path.read_text():
            continue
        for point in expand_grid(load_config(path)):
            found += 1
            assert point.eval.text.backend == "lm_eval" and not point.eval.text.gen_tasks
            assert all(offline_task(t) is not None for t in point.eval.text.tasks), (path, list(point.eval.text.tasks))
    assert found >= 12  # ablations/forgetting.yaml: 4 variants x 3 seeds
    with pytest.raises(FusionBenchError, match="gen_tasks=.*with eval.text.backend=lm_eval set eval.text.gen_tasks=\\[\\]"):
        load_config(root / "experiments/fusion/mlp.yaml", ["eval.text.backend=lm_eval"])
    assert load_config(root / "experiments/fusion/mlp.yaml", ["eval.text.backend=lm_eval", "eval.text.gen_tasks=[]"])
