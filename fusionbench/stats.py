"""Paired statistics shared by the evaluators and the report: bootstrap intervals over items (one
model's paired controls), Student-t intervals over seeds and items (two strategies' contrasts),
p-values, verdicts and the minimum detectable effect."""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: bootstrap replicates (enough for 95% percentile intervals stable to ~0.005 at n >= 100)
N_BOOT = 2000
#: z_{0.975} + z_{0.8}: an effect this many standard errors large is detected with 80% power at alpha 0.05
MDE_Z = 1.96 + 0.8416


#: the share of items on which two strategies' paired choices disagree in correctness, assumed when
#: sizing a test set before any pilot (the per-item variance of a paired accuracy difference is at
#: most this); a contrast may state its own (``contrasts[i].discordance``) once a pilot measured it
DISCORDANCE = 0.3


def items_needed(mde: float, discordance: float = DISCORDANCE) -> int:
    """Paired test items needed to detect an accuracy difference of ``mde`` with 80% power at
    alpha 0.05 (two-sided): ``n = (MDE_Z / mde)^2 * discordance`` (the per-item variance of the
    paired difference is at most the discordance). Every seed is scored on the same items, so more
    seeds do not lower this item term (they only average training noise, which adds to it: a
    floor, not a guarantee; ``fusionbench power`` adds the between-seed term from a pilot). Normal
    quantiles: the report's t interval needs ~0.1% more items at these sizes (942 items give an MDE
    of 0.05003 there), which a pre-registration check can ignore."""
    if not 0 < mde <= 1 or not 0 < discordance <= 1:
        raise ValueError(f"items_needed: mde in (0, 1] and discordance in (0, 1]; got {mde}, {discordance}")
    return int(np.ceil((MDE_Z / mde) ** 2 * discordance))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (2 ** 63), 0xB007]))


def bootstrap_diff(a: Sequence[float], b: Sequence[float] | None = None, n_boot: int = N_BOOT,
                   seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over paired items (``b`` None: the mean of ``a``) with its 95% percentile
    bootstrap interval over items, the bootstrap standard error and a two-sided p-value for 0."""
    a = np.asarray(a, dtype=float)
    d = a - (np.asarray(b, dtype=float) if b is not None else 0.0)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("bootstrap_diff needs a non-empty 1-d sample")
    idx = _rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    return _summary(float(d.mean()), d[idx].mean(1))


def paired_contrast(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]) -> dict[str, float]:
    """Difference of two strategies measured on the same items in the same seeds, with a 95%
    Student-t interval whose variance has a seed term and an item term.

    ``d[s, i] = a[s][i] - b[s][i]`` over ``S`` seeds and ``n`` items; the estimate is its mean. Both
    seeds (training noise) and items (a sample of the task) are random, and every seed scored the
    same items, so an item that is easy for one seed is easy for all: item noise does not average
    out over seeds. The variance of the mean is estimated as ``var_s(D_s) / S + var_i(dbar_i) / n``
    (``D_s``: seed ``s``'s mean difference, ``dbar_i``: item ``i``'s mean over seeds); that is the
    two-way random-effects variance plus one residual term ``var(e) / (nS)``, so in expectation it
    errs wide. Its degrees of freedom come from Welch-Satterthwaite: with 3 seeds and a seed term that
    dominates they approach 2, and the interval is as wide as 3 seeds honestly allow
    (``scripts/contrast_calibration.py`` measures its coverage: 0.94-0.96 with 3-10 seeds, where the
    hierarchical bootstrap used before covered 0.83 with 3 seeds at twice the seed noise of the
    study's first two mlp seeds, and 0.93, 35% narrower, at that noise). One seed: the item term
    alone (``df = n - 1``; the report marks such verdicts preliminary). ``a``/``b``: per-item values
    by seed (items in the same order). Only seeds present in both count (``seeds`` says how many).
    Sides with one value per seed (metrics without items) have the seed term alone and need at least
    2 seeds. Also returned: ``se``, ``df``, a two-sided ``p`` for 0 and ``mde``, the difference
    detected with 80% power at this standard error and df."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed has rows of both sides")
    diffs = []
    for s in seeds:
        x, y = np.asarray(a[s], dtype=float), np.asarray(b[s], dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: {len(x)} vs {len(y)} items; the two sides were not scored on the same items")
        diffs.append(x - y)
    if len({len(d) for d in diffs}) > 1:
        raise ValueError(f"the seeds were scored on different numbers of items ({sorted({len(d) for d in diffs})})")
    d = np.stack(diffs)  # [seeds, items]
    S, n = d.shape
    if n == 0:
        raise ValueError("the two sides have no items")
    if not np.isfinite(d).all():
        raise ValueError("a side has missing (NaN) or infinite values")
    if n == 1 and S < 2:
        raise ValueError("one value per seed and a single seed: an interval needs at least 2 seeds")
    terms = []  # (variance component of the mean, its degrees of freedom)
    if S > 1:
        terms.append((float(d.mean(1).var(ddof=1)) / S, S - 1))
    if n > 1:
        terms.append((float(d.mean(0).var(ddof=1)) / n, n - 1))
    var = sum(v for v, _ in terms)
    est = float(d.mean())
    if var <= 0:  # every seed and item gives the same difference
        return {"diff": est, "ci_lo": est, "ci_hi": est, "se": 0.0, "df": float("inf"),
                "p": 0.0 if est != 0 else 1.0, "mde": 0.0, "seeds": S, "items": n}
    df = welch_df(terms)
    se = float(np.sqrt(var))
    half = float(stats.t.ppf(0.975, df)) * se
    return {"diff": est, "ci_lo": est - half, "ci_hi": est + half, "se": se, "df": df,
            "p": float(min(1.0, 2 * stats.t.sf(abs(est) / se, df))), "mde": t_mde(se, df), "seeds": S, "items": n}


def welch_df(terms: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance components ``(variance, df)``
    (components of variance 0 left out; one component: its own df; none: infinite)."""
    live = [(v, f) for v, f in terms if v > 0]
    if not live:
        return float("inf")
    if len(live) == 1:
        return float(live[0][1])
    return float(sum(v for v, _ in live) ** 2 / sum(v ** 2 / f for v, f in live))


def t_mde(se: float, df: float) -> float:
    """The difference a two-sided t test at alpha 0.05 detects with 80% power at standard error
    ``se`` and ``df`` degrees of freedom: ``(t_0.975 + t_0.8) * se``."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * se


def _summary(estimate: float, boot: np.ndarray) -> dict[str, float]:
    lo, hi = np.percentile(boot, [2.5, 97.5])
    se = float(boot.std(ddof=1)) if len(boot) > 1 else float("nan")
    # two-sided bootstrap p for "no difference": how often the replicates fall on the other side of 0
    p = 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)) if se > 0 else (0.0 if estimate != 0 else 1.0)
    return {"diff": estimate, "ci_lo": float(lo), "ci_hi": float(hi), "se": se, "p": float(min(1.0, p)),
            "mde": MDE_Z * se}


def verdict(ci_lo: float, ci_hi: float, expected: str = "greater") -> str:
    """``supported`` when the 95% interval excludes 0 on the expected side (``greater``: a > b,
    ``less``: a < b), ``contradicted`` when it excludes 0 on the other side, else ``inconclusive``
    (at this n: see the minimum detectable effect)."""
    if expected not in ("greater", "less"):
        raise ValueError(f"expected must be 'greater' or 'less', got {expected!r}")
    if ci_lo > 0:
        return "supported" if expected == "greater" else "contradicted"
    if ci_hi < 0:
        return "supported" if expected == "less" else "contradicted"
    return "inconclusive"


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over all of ``p``), in the input order."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * float(p[i])))
        out[i] = running
    return out
