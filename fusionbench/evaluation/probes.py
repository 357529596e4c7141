"""Shallow vs deep: how far does visual information travel into the LM's text stream?

:func:`depth_probes` runs a small, seeded set of single-object ``scenes`` images through the
model once (one forward per batch, ``output_hidden_states=True`` on the LM decoder, with the
strategy's conditioning set by :meth:`VisionLanguageModel._lm_context`) and reports, for every
LM layer ``i`` in ``0..L`` (``hidden_states[0]`` is the embedding output, ``hidden_states[L]``
the last layer's output after the final norm, as transformers returns it):

``probe/<fact>/layer_<i>``
    test accuracy of a linear probe that reads the visual fact ``<fact>`` from the hidden state
    at the **last prompt token** (the position where the answer would be generated; it comes
    after the image and after the question, so it only "knows" the image through the LM).
    Facts: ``color`` (5 classes, :data:`~fusionbench.data.sources.scenes.COLORS`), ``column``
    (left/center/right of the 3x3 grid) and ``row`` (top/middle/bottom). Beside them
    ``probe/<fact>/majority`` (the most frequent training label, scored on the test items) and
    ``probe/<fact>/chance`` (``1 / classes``).

    The probe is multinomial logistic regression: features standardised with the training
    items' mean and standard deviation (a feature that is constant on the training items, up to
    1e-6 of the features' scale, is set to 0), weights and bias fit full-batch with L-BFGS
    (strong Wolfe line search, float64, zero init, so deterministic) on
    ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised); ``l2`` defaults to
    ``1 / n_train``, i.e. scikit-learn's default ``C=1``. All layers of one fact are fit in one
    batched L-BFGS run (exact reductions in :func:`fit_linear_probes`).

``probe/cos_img_text/layer_<i>``
    mean cosine similarity between image-token and text-token hidden states: for each item the
    mean of ``cos(h_a, h_b)`` over every pair (image token ``a``, text token ``b``), averaged
    over all (train and test) items. *Text tokens* here are the prompt tokens **after** the
    image (the question and the generation prompt): the tokens before it cannot attend to the
    image and are the same for every item. ``probe/cos_text_text/layer_<i>`` is the reference
    level, the mean cosine over distinct pairs of those text tokens (hidden states of LMs are
    anisotropic, so absolute cosines are only meaningful against it).

``probe/cka_img_text/layer_<i>``
    linear CKA (Kornblith et al., 2019) across items between ``X`` (``[n, D]``: each item's mean
    image-token hidden state) and ``Y`` (``[n, D]``: each item's mean text-token hidden state,
    text tokens as above), both at layer ``i``: with column-centred ``X, Y``,
    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, in ``[0, 1]``. It is high when items
    whose image tokens are alike also have alike text states, i.e. when the text stream's
    image-dependent variation follows the image representation. Where ``X`` or ``Y`` does not
    vary across items (up to 1e-6 of its scale) CKA is defined as 0; at layer 0 that is always
    the case for ``Y`` (text embeddings do not depend on the image).

Strategies that put no image tokens into the sequence (``flamingo``, ``prefix``: they condition
through cross-attention or key/value prefixes) have no image-token hidden states, so the
``cos_*`` and ``cka_*`` keys are **absent** for them; the probes are reported for every strategy.
``probe/n_image_tokens``, ``probe/n_train``, ``probe/n_test`` and ``probe/num_layers`` (``L``)
describe the run.

``probe/untrained/<fact>/layer_<i>`` (:func:`with_untrained`)
    the floor of the probes: the same probes on the same strategy built with the same seed
    *before training* (a randomly initialised connector already carries much of the image to
    the LM; a tanh-gated one at gate 0 carries nothing). ``probe/<fact>/best`` and
    ``probe/<fact>/best_untrained`` are the best layer's accuracy of each, and
    ``probe/<fact>/gain_over_untrained`` their difference: what training added.

``condition`` selects what the model sees: ``"image"`` (the scenes), ``"blank"`` (the same
all-zero normalised pixel tensor, i.e. a mean-grey picture, for every item) or ``"text_only"``
(no image and no image placeholders, the strategy's text-only mode). With ``blank`` or
``text_only`` every item's input is identical, so every probe can only reach the majority
baseline: the controls that show a probe above chance reads information that came from the
image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fusionbench.data.format import encode
from fusionbench.data.sources.scenes import COLORS, GRID, Scene, make_scene, render_scene
from fusionbench.errors import FusionBenchError
from fusionbench.model import IMAGE_TOKEN_ID

#: the fixed probe question: names neither colour nor place
PROBE_QUESTION = "What is in the image?"
CONDITIONS = ("image", "blank", "text_only")
COLOR_NAMES = tuple(COLORS)
COLUMN_NAMES = ("left", "center", "right")
ROW_NAMES = ("top", "middle", "bottom")
#: fact -> class names
FACTS: dict[str, tuple[str, ...]] = {"color": COLOR_NAMES, "column": COLUMN_NAMES, "row": ROW_NAMES}


# --------------------------------------------------------------------------- probe data

@dataclass(frozen=True)
class ProbeItem:
    scene: Scene
    labels: dict[str, int]  # fact -> class index


def _labels(scene: Scene) -> dict[str, int]:
    o = scene.objects[0]
    return {"color": COLOR_NAMES.index(o.color), "column": o.col, "row": o.row}


def probe_items(n_train: int, n_test: int, image_size: int, seed: int = 0) -> tuple[list[ProbeItem], list[ProbeItem]]:
    """``(train, test)`` single-object scenes from :func:`make_scene` (one ``numpy`` stream seeded
    by ``seed``). Each split follows its own shuffled round-robin over the 45 (colour, column,
    row) combinations, so colour, column and row are balanced within each split as far as its
    size allows; shape, jitter, size and background stay random. No picture (scene signature)
    occurs twice, so train and test never share an image."""
    if n_train < 2 or n_test < 1:
        raise FusionBenchError(f"depth probes need n_train >= 2 and n_test >= 1, got {n_train}, {n_test}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (2 ** 63), 0x9B0BE]))
    combos = [(c, col, row) for c in range(len(COLOR_NAMES)) for col in range(GRID) for row in range(GRID)]
    seen: set[str] = set()
    splits = []
    for size in (n_train, n_test):
        order = [combos[i] for i in rng.permutation(len(combos))]
        items = []
        for k in range(size):
            want = order[k % len(combos)]
            for _attempt in range(100_000):
                scene = make_scene(rng, image_size, n_objects=1)
                labels = _labels(scene)
                if (labels["color"], labels["column"], labels["row"]) == want and scene.signature() not in seen:
                    break
            else:  # pragma: no cover - 30k distinct single-object pictures exist
                raise FusionBenchError("depth probes: could not draw enough distinct scenes")
            seen.add(scene.signature())
            items.append(ProbeItem(scene, labels))
        splits.append(items)
    return splits[0], splits[1]


def probe_batch(model, items: list[ProbeItem], condition: str = "image") -> dict[str, torch.Tensor]:
    """The probe prompt (project prompt format, :func:`~fusionbench.data.format.encode`) for
    ``items``: ``input_ids``, ``attention_mask`` and, unless ``text_only``, ``pixel_values``.
    Every item has the same prompt, so no padding is needed."""
    if condition not in CONDITIONS:
        raise FusionBenchError(f"depth probes: condition {condition!r} is not one of {', '.join(CONDITIONS)}")
    has_image = condition != "text_only"
    ids, _ = encode(model.tokenizer, PROBE_QUESTION, None, model.num_image_tokens if has_image else 0, has_image)
    n = len(items)
    batch = {"input_ids": torch.tensor([ids] * n, dtype=torch.long),
             "attention_mask": torch.ones(n, len(ids), dtype=torch.long)}
    if has_image:
        pixels = model.vision.preprocess([render_scene(it.scene) for it in items])
        batch["pixel_values"] = torch.zeros_like(pixels) if condition == "blank" else pixels
    return batch


# --------------------------------------------------------------------------- hidden states

@torch.no_grad()
def collect_states(model, items: list[ProbeItem], condition: str = "image", batch_size: int = 32) -> dict[str, torch.Tensor]:
    """One decoder forward per batch with ``output_hidden_states=True``. Returns float32 tensors
    over layers ``0..L``: ``last [L+1, N, D]`` (last prompt token), and where the sequence has
    image tokens ``img_mean``/``text_mean [L+1, N, D]`` (mean image-token / mean post-image
    text-token state) and ``cos_img_text``/``cos_text_text [L+1, N]`` (per-item mean cosines,
    see the module docstring); ``n_image_tokens`` (a 0-d tensor)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    n_image = 0
    try:
        for start in range(0, len(items), batch_size):
            batch = probe_batch(model, items[start:start + batch_size], condition)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with model._lm_context(ids, mask, batch.get("pixel_values")) as kwargs:
                out = model.lm.get_decoder()(**kwargs, use_cache=False, output_hidden_states=True)
            hs = torch.stack([h.float() for h in out.hidden_states])  # [L+1, B, T, D] on the model's device
            parts.setdefault("last", []).append(hs[:, :, -1].cpu())  # the probes fit on the CPU
            image_pos = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
            n_image = int(image_pos.numel())
            if n_image == 0:
                continue
            text_pos = torch.arange(int(image_pos.max()) + 1, ids.shape[1])
            image_pos, text_pos = image_pos.to(hs.device), text_pos.to(hs.device)
            img, txt = hs[:, :, image_pos], hs[:, :, text_pos]  # [L+1, B, n_img, D], [L+1, B, n_txt, D]
            parts.setdefault("img_mean", []).append(img.mean(2).cpu())
            parts.setdefault("text_mean", []).append(txt.mean(2).cpu())
            img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            parts.setdefault("cos_img_text", []).append((img_n @ txt_n.transpose(-1, -2)).mean((-1, -2)).cpu())
            tt = txt_n @ txt_n.transpose(-1, -2)  # [L+1, B, n_txt, n_txt]
            k = tt.shape[-1]
            off_diag = (tt.sum((-1, -2)) - tt.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(k * (k - 1), 1)
            parts.setdefault("cos_text_text", []).append(off_diag.cpu())
    finally:
        model.train(was_training)
    states = {k: torch.cat(v, dim=1) for k, v in parts.items()}
    states["n_image_tokens"] = torch.tensor(n_image)
    return states


# --------------------------------------------------------------------------- probe and CKA

def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature standardisation with the training items' statistics; ``[G, n, d]`` batches of
    independent problems. Features constant on the training items (std <= 1e-6 of the mean
    absolute feature value of that problem) become 0."""
    mean, std = train_x.mean(1, keepdim=True), train_x.std(1, unbiased=False, keepdim=True)
    scale = train_x.abs().mean((1, 2), keepdim=True).clamp_min(1e-30)
    keep = std > 1e-6 * scale
    inv = torch.where(keep, 1.0 / std.clamp_min(1e-30), torch.zeros_like(std))
    return (train_x - mean) * inv, (test_x - mean) * inv


def fit_linear_probes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      n_classes: int, l2: float | None = None, max_iter: int = 500) -> torch.Tensor:
    """Test accuracies ``[G]`` of ``G`` independent multinomial logistic-regression probes
    (definition in the module docstring), one per feature set: ``train_x [G, n, d]`` and
    ``test_x [G, m, d]`` share the labels ``train_y [n]`` / ``test_y [m]``.

    Exact reductions that make this fast: by the representer theorem the L2-regularised optimum
    ``W`` lies in the row space of the (standardised) training features, so each problem is
    solved in the coordinates of its top right singular vectors (at most ``n`` of them, the
    same predictions and penalty as in ``d`` dimensions); and the ``G`` problems are separable,
    so one L-BFGS run on the sum of their objectives reaches every problem's optimum."""
    x_tr, x_te = _standardise(train_x.double(), test_x.double())
    y_tr = train_y.long()
    n = y_tr.numel()
    lam = 1.0 / n if l2 is None else float(l2)
    g = x_tr.shape[0]
    if x_tr.shape[2] > n:  # reduce to the training span: X = U S V^T, W = V B
        _, _, vh = torch.linalg.svd(x_tr, full_matrices=False)  # vh [G, n, d]
        basis = vh.transpose(1, 2)
        x_tr, x_te = x_tr @ basis, x_te @ basis
    weight = torch.zeros(g, x_tr.shape[2], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(g, 1, n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-8, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    targets = y_tr.repeat(g)

    def closure():
        opt.zero_grad()
        logits = (x_tr @ weight + bias).reshape(g * n, n_classes)
        loss = F.cross_entropy(logits, targets, reduction="sum") / n + 0.5 * lam * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (x_te @ weight + bias).argmax(-1)  # [G, m]
    return (pred == test_y.long()).double().mean(1).float()


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     n_classes: int, l2: float | None = None) -> float:
    """Test accuracy of one probe fit on ``(train_x [n, d], train_y [n])``."""
    return float(fit_linear_probes(train_x[None], train_y, test_x[None], test_y, n_classes, l2)[0])


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x [n, d1]`` and ``y [n, d2]`` (rows: the same n items); 0 where
    either side does not vary across items (up to 1e-6 of its scale)."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    for raw, c in ((x, xc), (y, yc)):
        if float(c.norm()) <= 1e-6 * float(raw.norm()) or float(c.norm()) == 0.0:
            return 0.0
    num = (yc.T @ xc).norm() ** 2
    den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return float(num / den)


# --------------------------------------------------------------------------- entry point

def depth_probes(model, n_train: int = 128, n_test: int = 64, seed: int = 0, image_size: int | None = None,
                 condition: str = "image", batch_size: int = 32, l2: float | None = None) -> dict[str, float]:
    """Depth probes and image-text similarity per LM layer (keys in the module docstring).
    ``image_size`` is the size the scenes are drawn at (default: the vision encoder's input
    size). Nothing is cached on disk; the model's train/eval mode is restored."""
    size = int(image_size or model.vision.image_size)
    train, test = probe_items(n_train, n_test, size, seed)
    states = collect_states(model, train + test, condition, batch_size)
    last = states["last"]
    num_layers = last.shape[0] - 1
    metrics: dict[str, float] = {"probe/n_train": float(n_train), "probe/n_test": float(n_test),
                                 "probe/num_layers": float(num_layers),
                                 "probe/n_image_tokens": float(states["n_image_tokens"])}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for fact, names in FACTS.items():
            y = torch.tensor([it.labels[fact] for it in train + test])
            y_tr, y_te = y[:n_train], y[n_train:]
            majority = int(torch.bincount(y_tr, minlength=len(names)).argmax())
            metrics[f"probe/{fact}/chance"] = 1.0 / len(names)
            metrics[f"probe/{fact}/majority"] = float((y_te == majority).double().mean())
            accs = fit_linear_probes(last[:, :n_train], y_tr, last[:, n_train:], y_te, len(names), l2=l2)
            for layer in range(num_layers + 1):
                metrics[f"probe/{fact}/layer_{layer}"] = float(accs[layer])
    if "img_mean" in states:
        for layer in range(num_layers + 1):
            metrics[f"probe/cos_img_text/layer_{layer}"] = float(states["cos_img_text"][layer].mean())
            metrics[f"probe/cos_text_text/layer_{layer}"] = float(states["cos_text_text"][layer].mean())
            metrics[f"probe/cka_img_text/layer_{layer}"] = linear_cka(states["img_mean"][layer],
                                                                      states["text_mean"][layer])
    for k, v in metrics.items():
        if not math.isfinite(v):
            raise FusionBenchError(f"depth probes: {k} is not finite ({v})")
    return metrics


def with_untrained(trained: dict[str, float], untrained: dict[str, float]) -> dict[str, float]:
    """``trained`` probe metrics plus the untrained model's probe curves under
    ``probe/untrained/<fact>/layer_<i>`` and the best-layer summary per fact (module docstring).
    Without ``untrained`` (probes not measured before training) only ``probe/<fact>/best``."""
    out = dict(trained)
    for fact in FACTS:
        layers = [k for k in trained if k.startswith(f"probe/{fact}/layer_")]
        out[f"probe/{fact}/best"] = max(trained[k] for k in layers)
        if untrained:
            for k in layers:
                out[k.replace("probe/", "probe/untrained/", 1)] = untrained[k]
            out[f"probe/{fact}/best_untrained"] = max(untrained[k] for k in layers)
            out[f"probe/{fact}/gain_over_untrained"] = out[f"probe/{fact}/best"] - out[f"probe/{fact}/best_untrained"]
    return out
