"""Depth probes and image-text similarity per layer (fusionbench.evaluation.probes), tiny tier."""
from __future__ import annotations

import pytest
import torch

from fusionbench.evaluation.probes import (FACTS, collect_states, depth_probes, fit_linear_probe, linear_cka,
                                           probe_batch, probe_items)
from fusionbench.model import IMAGE_TOKEN_ID

from helpers import tiny_model

N_TRAIN, N_TEST = 64, 32


@pytest.fixture(scope="module")
def mlp():
    return tiny_model("mlp")


@pytest.fixture(scope="module")
def mlp_probes(mlp):
    return depth_probes(mlp, n_train=N_TRAIN, n_test=N_TEST, seed=0)


def _layers(model) -> int:
    return model.lm.config.num_hidden_layers


def test_keys_for_every_layer_and_accuracies_in_range(mlp, mlp_probes):
    L = _layers(mlp)
    assert mlp_probes["probe/num_layers"] == L
    for fact, names in FACTS.items():
        assert mlp_probes[f"probe/{fact}/chance"] == pytest.approx(1 / len(names))
        assert 0.0 <= mlp_probes[f"probe/{fact}/majority"] <= 1.0
        for i in range(L + 1):
            assert 0.0 <= mlp_probes[f"probe/{fact}/layer_{i}"] <= 1.0
        assert f"probe/{fact}/layer_{L + 1}" not in mlp_probes
    for metric in ("cos_img_text", "cos_text_text", "cka_img_text"):
        for i in range(L + 1):
            assert -1.0 <= mlp_probes[f"probe/{metric}/layer_{i}"] <= 1.0
    for i in range(L + 1):
        assert mlp_probes[f"probe/cka_img_text/layer_{i}"] >= 0.0
    # layer 0 = text embeddings: the same for every image, so no shared structure
    assert mlp_probes["probe/cka_img_text/layer_0"] == 0.0
    assert mlp_probes["probe/color/layer_0"] == mlp_probes["probe/color/majority"]


def test_image_information_reaches_the_text_stream(mlp_probes):
    # random tiny models still pass the image on: the single object's colour/column are readable
    # at the last prompt token after a few layers, clearly above the majority baseline
    for fact in ("color", "column"):
        best = max(v for k, v in mlp_probes.items() if k.startswith(f"probe/{fact}/layer_"))
        assert best >= mlp_probes[f"probe/{fact}/majority"] + 0.25, (fact, best)


@pytest.mark.parametrize("condition", ["text_only", "blank"])
def test_no_image_information_gives_chance_at_every_layer(mlp, condition):
    out = depth_probes(mlp, n_train=N_TRAIN, n_test=N_TEST, seed=0, condition=condition)
    for fact in FACTS:
        for i in range(_layers(mlp) + 1):
            assert out[f"probe/{fact}/layer_{i}"] == out[f"probe/{fact}/majority"], (condition, fact, i)
    if condition == "text_only":
        assert out["probe/n_image_tokens"] == 0
        assert not any(k.startswith(("probe/cos_", "probe/cka_")) for k in out)
    else:  # same picture for every item: image and text states do not co-vary across items
        assert all(out[f"probe/cka_img_text/layer_{i}"] == 0.0 for i in range(_layers(mlp) + 1))


def test_probe_is_real_on_synthetic_features():
    g = torch.Generator().manual_seed(0)
    n_tr, n_te, d, k = 300, 200, 32, 5
    y = torch.randint(0, k, (n_tr + n_te,), generator=g)
    x = torch.randn(n_tr + n_te, d, generator=g)
    direction = torch.randn(d, generator=g)
    # the class is written along one direction (6 noise standard deviations apart), noise elsewhere
    encoded = x + 6.0 * y.unsqueeze(1).float() * direction / direction.norm()
    acc = fit_linear_probe(encoded[:n_tr], y[:n_tr], encoded[n_tr:], y[n_tr:], k)
    assert acc >= 0.95
    random_y = torch.randint(0, k, (n_tr + n_te,), generator=g)
    acc_random = fit_linear_probe(x[:n_tr], random_y[:n_tr], x[n_tr:], random_y[n_tr:], k)
    assert abs(acc_random - 1 / k) < 0.1
    # deterministic
    assert fit_linear_probe(x[:n_tr], random_y[:n_tr], x[n_tr:], random_y[n_tr:], k) == acc_random


def test_linear_cka_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x @ q * 3.0 + 1.0) == pytest.approx(1.0, abs=1e-9)  # invariant to rotation, scale, shift
    assert linear_cka(x, torch.randn(50, 8, generator=g)) < 0.5
    assert linear_cka(x, torch.ones(50, 8)) == 0.0


def test_probe_items_balanced_seeded_and_disjoint():
    train, test = probe_items(45, 45, 32, seed=3)
    again, _ = probe_items(45, 45, 32, seed=3)
    assert [it.scene for it in train] == [it.scene for it in again]
    assert not {it.scene.signature() for it in train} & {it.scene.signature() for it in test}
    for items in (train, test):
        assert all(len(it.scene.objects) == 1 for it in items)
        for fact, names in FACTS.items():
            counts = torch.bincount(torch.tensor([it.labels[fact] for it in items]), minlength=len(names))
            assert counts.min() == counts.max() == 45 // len(names)


def test_image_positions_mlp_and_none_for_flamingo(mlp):
    items, _ = probe_items(4, 1, mlp.vision.image_size, seed=0)
    batch = probe_batch(mlp, items)
    assert mlp.num_image_tokens == 16
    positions = (batch["input_ids"] == IMAGE_TOKEN_ID).nonzero()[:, 1].view(4, -1)
    assert positions.shape[1] == 16
    assert torch.equal(positions[0], torch.arange(int(positions[0, 0]), int(positions[0, 0]) + 16))  # contiguous
    assert int(positions.max()) < batch["input_ids"].shape[1] - 1  # the probed last token is text
    states = collect_states(mlp, items)
    assert int(states["n_image_tokens"]) == 16
    assert states["last"].shape == (_layers(mlp) + 1, 4, mlp.lm.config.hidden_size)

    flamingo = tiny_model("flamingo")
    out = depth_probes(flamingo, n_train=16, n_test=8, seed=0)
    assert out["probe/n_image_tokens"] == 0
    assert "probe/color/layer_0" in out and f"probe/row/layer_{_layers(flamingo)}" in out
    assert not any(k.startswith(("probe/cos_", "probe/cka_")) for k in out)


def test_model_mode_restored(mlp):
    mlp.train()
    items, _ = probe_items(2, 1, mlp.vision.image_size, seed=0)
    collect_states(mlp, items)
    assert mlp.training
    mlp.eval()


def test_untrained_connector_control_is_measured_before_training(tmp_path):
    """A run with probes reports the same probes of the untrained model (its floor): measured on the
    freshly built model, equal to probing a fresh build with the same seed, and the best-layer gain
    is trained minus untrained."""
    from fusionbench.config import load_config
    from fusionbench.evaluation.probes import with_untrained
    from fusionbench.runner import Prepared

    from helpers import TINY

    cfg = load_config(TINY, ["fusion=mlp", "eval.probes=true", "eval.probe_train=16", "eval.probe_test=8",
                             f"output_dir={tmp_path}"])
    prep = Prepared(cfg, text_suite=False)
    fresh = depth_probes(prep.model, n_train=16, n_test=8, seed=cfg.seed)
    assert prep.untrained_probes == fresh                       # measured before any weight moved
    with torch.no_grad():                                       # "training": move the connector
        for p in prep.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    out = with_untrained(depth_probes(prep.model, n_train=16, n_test=8, seed=cfg.seed), prep.untrained_probes)
    for fact in FACTS:
        L = int(out["probe/num_layers"])
        assert [out[f"probe/untrained/{fact}/layer_{i}"] for i in range(L + 1)] == \
            [fresh[f"probe/{fact}/layer_{i}"] for i in range(L + 1)]
        assert out[f"probe/{fact}/gain_over_untrained"] == pytest.approx(
            out[f"probe/{fact}/best"] - out[f"probe/{fact}/best_untrained"])
    assert Prepared(load_config(TINY, [f"output_dir={tmp_path}"]), text_suite=False).untrained_probes == {}
