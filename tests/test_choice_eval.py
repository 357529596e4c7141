"""The multimodal measurement that can tell whether a strategy uses the image: balanced test
items, choice scoring equal to full-sequence log-likelihoods, a derangement for the shuffled
control, bootstrap intervals checked against hand-computable cases, trained blind baselines."""
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from fusionbench.config import DataConfig
from fusionbench.data import DATASETS
from fusionbench.data.controls import blind_images, derangement
from fusionbench.data.sources import scenes as sc
from fusionbench.errors import FusionBenchError
from fusionbench.evaluation.choice import candidate_tokens, choice_logprobs, evaluate_choice, item_choices
from fusionbench.data.format import encode, system_prompt_for
from fusionbench.stats import bootstrap_diff, holm, paired_contrast, verdict
from tests.helpers import tiny_model, train_a_few_steps


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- balanced test sets ------------------------------------------------------------------------------
def test_gold_answers_are_uniform_within_every_template():
    cfg = DataConfig(test_size=600, seed=0)
    counts: dict[str, Counter] = defaultdict(Counter)
    answer_sets = {t.name: t.answers for ts in sc.templates().values() for t in ts}
    for row, _ in sc.generate_examples(cfg, "test"):
        assert row["answer"] in row["choices"] and tuple(row["choices"]) == answer_sets[row["template"]]
        counts[row["template"]][row["answer"]] += 1
    assert set(counts) == set(answer_sets)  # every template is asked
    for name, c in counts.items():
        per_answer = [c[a] for a in answer_sets[name]]
        assert max(per_answer) - min(per_answer) <= 1, (name, dict(c))
    qtypes = Counter(r["qtype"] for r, _ in sc.generate_examples(cfg, "test"))
    assert max(qtypes.values()) - min(qtypes.values()) <= 1


def test_cifar_grid_gold_answers_are_uniform_within_every_template():
    """cifar_grid (on synthetic CIFAR arrays): the same balance and closed answer sets as scenes,
    with the answers the grid's pixels say (tests/test_data_sources.py checks them by oracle)."""
    from fusionbench.data.sources import cifar_grid as cg
    from tests.test_data_sources import synthetic_cifar

    images, labels = synthetic_cifar()
    cfg = DataConfig(name="cifar_grid", test_size=420, seed=0, image_size=64)
    answer_sets = {t.name: t.answers for ts in cg.templates(list(cg.CLASSES)).values() for t in ts}
    counts: dict[str, Counter] = defaultdict(Counter)
    ds = cg.build_grids(images, labels, cfg, "test")
    for row in ds:
        assert row["answer"] in row["choices"] and tuple(row["choices"]) == answer_sets[row["template"]]
        counts[row["template"]][row["answer"]] += 1
    assert set(counts) == set(answer_sets)
    for name, c in counts.items():
        per_answer = [c[a] for a in answer_sets[name]]
        assert max(per_answer) - min(per_answer) <= 1, (name, dict(c))
    qtypes = Counter(ds["qtype"])
    assert max(qtypes.values()) - min(qtypes.values()) <= 1


def test_a_blind_guess_scores_chance_on_the_balanced_set():
    """The strongest question-blind rule per template (always its most frequent gold answer) is at
    chance + at most one item per template, by construction."""
    rows = [r for r, _ in sc.generate_examples(DataConfig(test_size=300, seed=2), "test")]
    by_t: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_t[r["template"]][r["answer"]] += 1
    best = sum(c.most_common(1)[0][1] for c in by_t.values()) / len(rows)
    chance = np.mean([1 / len(r["choices"]) for r in rows])
    assert best <= chance + len(by_t) / len(rows)


def test_test_split_is_disjoint_and_the_same_for_every_run_seed(cache):
    cfg = DataConfig(train_size=200, val_size=40, test_size=40)
    test = DATASETS.get("scenes")(cfg, "test")
    assert set(test["template"]) and all(len(c) >= 2 for c in test["choices"])
    imgs = lambda ds: set(x["bytes"] for x in ds.cast_column("image", type(ds.features["image"])(decode=False))["image"])  # noqa: E731
    assert not imgs(test) & imgs(DATASETS.get("scenes")(cfg, "train"))
    assert not imgs(test) & imgs(DATASETS.get("scenes")(cfg, "val"))
    for _, scene in sc.generate_examples(cfg, "test"):
        assert scene.split_bucket() == "test"


# -- choice scoring ---------------------------------------------------------------------------------
def _full_sequence_logprob(model, question, qtype, answer, image, preprocess):
    tok = model.tokenizer
    has_image = image is not None
    prompt = encode(tok, question, None, model.num_image_tokens if has_image else 0, has_image,
                    system_prompt_for(qtype))[0]
    cand = candidate_tokens(tok, answer)
    ids = torch.tensor([prompt + cand])
    logits = model.logits(ids, torch.ones_like(ids), preprocess([image]) if has_image else None)
    logp = logits[0].float().log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(cand)))


@pytest.mark.parametrize("strategy", ["mlp", "prefix", "flamingo", "visual_expert"])
def test_choice_scores_equal_summed_token_logprobs_of_the_full_sequence(cache, strategy):
    model = tiny_model(strategy)
    train_a_few_steps(model)
    ds = DATASETS.get("scenes")(DataConfig(train_size=8, val_size=8, test_size=12, image_size=32), "test")
    choices, _ = item_choices(ds)
    assert any(len(candidate_tokens(model.tokenizer, c)) > 1 for cc in choices for c in cc)  # both paths run
    pre = model.vision.preprocess
    for images in (ds["image"], None):
        with torch.no_grad():
            got = choice_logprobs(model, ds["question"], ds["qtype"], choices, images, pre, batch_size=5)
            for i in range(0, len(ds), 3):
                want = [_full_sequence_logprob(model, ds[i]["question"], ds[i]["qtype"], c,
                                               images[i] if images is not None else None, pre) for c in choices[i]]
                assert np.allclose(got[i], want, atol=2e-4), (strategy, i, got[i], want)


def test_evaluate_choice_reports_accuracy_controls_and_items(cache):
    model = tiny_model("mlp")
    ds = DATASETS.get("scenes")(DataConfig(train_size=8, val_size=8, test_size=24, image_size=32), "test")
    m = evaluate_choice(model, ds, model.vision.preprocess, batch_size=8, seed=0)
    assert m["mm/choice/n"] == 24 and m["mm/choice/candidates"] == "per_item"
    for g in ("", "attribute/", "count/", "spatial/"):
        k = f"mm/choice/{g}"
        assert 0 <= m[f"{k}acc"] <= 1 and 0 < m[f"{k}chance"] < 1
        assert m[f"{k}image_gain"] == pytest.approx(m[f"{k}acc"] - m[f"{k}acc_shuffled"])
        assert m[f"{k}image_gain_ci_lo"] <= m[f"{k}image_gain"] <= m[f"{k}image_gain_ci_hi"]
        assert len(m[f"{k}items"]) == m[f"{k}n"] and set(m[f"{k}items"]) <= {"0", "1"}
        assert m[f"{k}items"].count("1") / m[f"{k}n"] == pytest.approx(m[f"{k}acc"])
    # a frozen-text strategy without an image is the base LM: its no-image accuracy does not move
    train_a_few_steps(model)
    m2 = evaluate_choice(model, ds, model.vision.preprocess, batch_size=8, seed=0)
    assert m2["mm/choice/acc_no_image"] == m["mm/choice/acc_no_image"]
    assert m2["mm/choice/test_hash"] == m["mm/choice/test_hash"]


def test_items_without_two_candidates_are_one_clear_error(cache):
    ds = DATASETS.get("scenes")(DataConfig(train_size=8, val_size=8, test_size=6, image_size=32), "test")
    bad = ds.map(lambda r: {"choices": [r["answer"]]})
    with pytest.raises(FusionBenchError, match="fewer than two candidate"):
        item_choices(bad)
    wrong = ds.map(lambda r: {"choices": ["zzz", "yyy"]})
    with pytest.raises(FusionBenchError, match="not among its candidates"):
        item_choices(wrong)


# -- controls ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_shuffled_control_is_a_derangement(n):
    p = derangement(n, seed=7)
    assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    assert np.array_equal(p, derangement(n, seed=7))
    with pytest.raises(FusionBenchError):
        derangement(1, seed=0)


def test_blind_training_images(cache):
    cfg = DataConfig(train_size=12, val_size=4, image_size=32)
    ds = DATASETS.get("scenes")(cfg, "train")
    raw = lambda d: [x["bytes"] for x in d.cast_column("image", type(d.features["image"])(decode=False))["image"]]  # noqa: E731
    shuffled = blind_images(ds, "shuffled", seed=0)
    assert shuffled["question"] == ds["question"] and sorted(raw(shuffled)) == sorted(raw(ds))
    assert all(a != b for a, b in zip(raw(shuffled), raw(ds)))  # every question lost its own image
    blank = blind_images(ds, "blank", seed=0)
    assert len(set(raw(blank))) == 1 and blank[0]["image"].size == ds[0]["image"].size
    assert blind_images(ds, "real", seed=0) is ds


# -- statistics ---------------------------------------------------------------------------------------
def test_bootstrap_interval_matches_hand_computable_cases():
    same = bootstrap_diff(np.ones(50), np.zeros(50))
    assert same["diff"] == 1 and same["ci_lo"] == same["ci_hi"] == 1 and same["p"] == 0
    # a Bernoulli(1/2) mean over n = 400 items: s.e. = sqrt(.25 / 400) = 0.025, 95% CI = +-0.049
    x = np.array([0, 1] * 200)
    r = bootstrap_diff(x, n_boot=4000, seed=1)
    assert r["diff"] == 0.5 and r["se"] == pytest.approx(0.025, rel=0.1)
    assert r["ci_lo"] == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert r["ci_hi"] == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    assert r["mde"] == pytest.approx(2.8 * 0.025, rel=0.1)


def test_paired_contrast_uses_seeds_and_items_and_gives_verdicts():
    rng = np.random.default_rng(0)
    a = {s: (rng.random(300) < 0.7).astype(int) for s in range(3)}
    b = {s: (rng.random(300) < 0.5).astype(int) for s in range(3)}
    r = paired_contrast(a, b)
    assert r["seeds"] == 3 and r["items"] == 300 and 0.1 < r["diff"] < 0.3 and r["ci_lo"] > 0 and r["p"] < 0.01
    assert verdict(r["ci_lo"], r["ci_hi"], "greater") == "supported"
    assert verdict(r["ci_lo"], r["ci_hi"], "less") == "contradicted"
    null = paired_contrast(b, {s: v[::-1].copy() for s, v in b.items()})
    assert verdict(null["ci_lo"], null["ci_hi"]) == "inconclusive" or abs(null["diff"]) > 0.05
    with pytest.raises(ValueError, match="same items"):
        paired_contrast({0: [1, 0]}, {0: [1, 0, 1]})


def test_paired_contrast_interval_is_student_t_with_a_seed_and_an_item_term():
    from scipy import stats

    # one seed: the item term alone, df = n - 1
    r = paired_contrast({0: [0, 1] * 200}, {0: [0] * 400})
    se = np.std([0, 1] * 200, ddof=1) / np.sqrt(400)
    assert r["diff"] == 0.5 and r["df"] == 399 and r["se"] == pytest.approx(se)
    assert r["ci_hi"] - 0.5 == pytest.approx(stats.t.ppf(0.975, 399) * se)
    # one value per seed (no items): the seed term alone, df = S - 1, so 3 seeds use t_2 = 4.30
    r = paired_contrast({0: [0.5], 1: [0.7], 2: [0.6]}, {0: [0.0], 1: [0.0], 2: [0.0]})
    assert r["diff"] == pytest.approx(0.6) and r["df"] == pytest.approx(2)
    assert r["ci_lo"] == pytest.approx(0.6 - 4.3027 * 0.1 / np.sqrt(3), abs=1e-4)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_contrast({0: [0.5]}, {0: [0.1]})
    # both terms, by hand: 3 seeds x 4 items
    d = np.array([[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=float)
    r = paired_contrast({s: d[s] for s in range(3)}, {s: np.zeros(4) for s in range(3)})
    v_seed, v_item = d.mean(1).var(ddof=1) / 3, d.mean(0).var(ddof=1) / 4
    df = (v_seed + v_item) ** 2 / (v_seed ** 2 / 2 + v_item ** 2 / 3)
    se = np.sqrt(v_seed + v_item)
    assert r["diff"] == pytest.approx(d.mean()) and r["se"] == pytest.approx(se) and r["df"] == pytest.approx(df)
    assert r["ci_lo"] == pytest.approx(d.mean() - stats.t.ppf(0.975, df) * se)
    assert r["p"] == pytest.approx(2 * stats.t.sf(d.mean() / se, df))
    assert r["mde"] == pytest.approx((stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * se)
    with pytest.raises(ValueError, match="NaN"):
        paired_contrast({0: [1.0, np.nan], 1: [0.0, 1.0]}, {0: [0.0, 0.0], 1: [0.0, 0.0]})
    # p < 0.05 exactly when the 95% interval excludes 0
    rng = np.random.default_rng(7)
    for _ in range(50):
        x = {s: (rng.random(60) < 0.6).astype(int) for s in range(3)}
        y = {s: (rng.random(60) < 0.5).astype(int) for s in range(3)}
        q = paired_contrast(x, y)
        assert (q["p"] < 0.05) == (q["ci_lo"] > 0 or q["ci_hi"] < 0)
    # seeds that disagree widen the interval the items alone would give
    rng = np.random.default_rng(3)
    items = (rng.random(1000) < 0.6).astype(int)
    flat = paired_contrast({s: items for s in range(3)}, {s: np.roll(items, 1) for s in range(3)})
    # seed s of b loses a further 10% of its right answers: the seeds' differences spread by ~0.06
    noisy = paired_contrast({s: items for s in range(3)},
                            {s: np.where(rng.random(1000) < 0.1 * s, 0, np.roll(items, 1)) for s in range(3)})
    assert noisy["ci_hi"] - noisy["ci_lo"] > 1.5 * (flat["ci_hi"] - flat["ci_lo"]) and noisy["df"] < 10


def test_paired_contrast_covers_the_truth_under_seed_noise():
    """3 seeds whose training noise dominates (the regime of the study's rows): the 95% interval
    must contain the true difference (0: both strategies drawn alike) in about 95% of replicates;
    an interval without the seed term, or with normal quantiles, covers far less here."""
    rng = np.random.default_rng(0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    hits = 0
    for _ in range(300):
        z = rng.normal(0.3, 1.5, 300)
        za, zb = z + rng.normal(0, 0.5, 300), z + rng.normal(0, 0.5, 300)
        ua, ub = rng.normal(0, 0.3, (2, 3))
        a = {s: (rng.random(300) < sig(za + ua[s])).astype(int) for s in range(3)}
        b = {s: (rng.random(300) < sig(zb + ub[s])).astype(int) for s in range(3)}
        r = paired_contrast(a, b)
        hits += r["ci_lo"] <= 0 <= r["ci_hi"]
    assert 0.91 <= hits / 300 <= 0.995


def test_holm_adjusts_for_every_contrast_of_the_family():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []
