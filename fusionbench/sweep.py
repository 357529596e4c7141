"""``fusionbench sweep CONFIG``: every point of a config's grid (x seeds), resumable.

* a point whose config hash already has a finished row for every stage in the results table is
  skipped; a stage with a row is not evaluated again, a trained stage is not trained again;
* a point killed mid-training continues from its newest Lightning checkpoint
  (``trainer.checkpoint_every_n_steps``);
* a failing point is recorded (``<output_dir>/<name>/sweep.jsonl``, with its traceback) and the sweep
  goes on; the exit status says how many failed;
* progress (done / skipped / failed / left, elapsed, estimate) is logged after every point.

Each point trains with the Lightning strategy of its config (``trainer.strategy: ddp``,
``trainer.devices: N``, ``trainer.num_nodes``): the same command runs a point on several GPUs or
processes; rank 0 evaluates and writes the rows.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionbench.config import config_hash, grid_points
from fusionbench.errors import FusionBenchError
from fusionbench.results import append_row, check_writable, code_hash, git_sha, read_results
from fusionbench.runner import (check_plan_hardware, checkpoint_step, checkpoint_target, log, run_dir_of, run_point,
                                stage_checkpoint, stage_plan)


def finished_stages(results_file: str | Path) -> dict[str, set[str]]:
    """config hash -> stages that have a training row (``fusionbench eval`` rows do not count)."""
    df = read_results(results_file)
    if not len(df) or "config_hash" not in df:
        return {}
    if "source" in df:
        df = df[df["source"].isna() | (df["source"] != "eval")]
    done: dict[str, set[str]] = {}
    for h, stage in zip(df["config_hash"], df["stage"]):
        done.setdefault(str(h), set()).add(str(stage))
    return done


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def select(points: list[tuple[dict[str, Any], DictConfig]], only: list[str] | None) -> list[tuple[dict[str, Any], DictConfig]]:
    """The points whose label has one of the values ``only`` names (a variant's label, a strategy
    of a ``fusion`` axis, ...; None: every point); a name no point has is an error."""
    if not only:
        return points
    values = [{str(v) for v in label.values()} for label, _ in points]
    unknown = [o for o in only if not any(o in v for v in values)]
    if unknown:
        known = sorted(set().union(*values)) if values else []
        raise FusionBenchError(f"--only {', '.join(unknown)}: no grid point has that label; labels: {', '.join(known)}")
    return [p for p, v in zip(points, values) if v & set(only)]


def sweep(cfg: DictConfig, only: list[str] | None = None) -> dict[str, Any]:
    """Run every point not yet finished (``only``: of those :func:`select` picks); returns counts
    ``{done, skipped, failed, total}`` and the failed points."""
    git_sha(), code_hash()  # provenance: the code loaded at the start (see results.git_sha)
    points = select(grid_points(cfg), only)  # every point validated before the first one starts
    if not points:
        raise FusionBenchError("the grid has no points")
    for _, point in points:  # and its stages and their Lightning settings (runner.check_hardware)
        check_plan_hardware(point, stage_plan(point))
    for results_file in dict.fromkeys(p.results_file for _, p in points):
        check_writable(results_file)  # one error, not one failed point after another
    # one snapshot of what is finished, taken before anything runs (the same on every rank)
    done = finished_stages(cfg.results_file)
    status_file = Path(cfg.output_dir) / cfg.name / "sweep.jsonl"
    rank = _rank()
    counts = {"total": len(points), "done": 0, "skipped": 0, "failed": 0}
    failed: list[dict[str, Any]] = []
    t0, worked = time.time(), 0.0
    for i, (label, point) in enumerate(points):
        h = config_hash(point)
        stages = {s.name for s in stage_plan(point)}
        have = done.get(h, set()) & stages
        what = " ".join(f"{k}={v}" for k, v in label.items()) or point.fusion.name
        if have == stages:
            counts["skipped"] += 1
            log(f"sweep {i + 1}/{len(points)}: {what} seed={point.seed} [{h}] already in {point.results_file}; skipped")
            continue
        log(f"sweep {i + 1}/{len(points)}: {what} seed={point.seed} [{h}]")
        start = time.time()
        entry = {"point": i, "config_hash": h, "label": label, "seed": point.seed, "started": start}
        try:
            run_point(point, done_stages=have, label=label)
            counts["done"] += 1
            entry["status"] = "done"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failed point must not stop the sweep
            counts["failed"] += 1
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            failed.append(entry)
            log(f"sweep {i + 1}/{len(points)}: FAILED {what} seed={point.seed}: {type(e).__name__}: {e} "
                f"(traceback in {status_file}); going on")
        entry["seconds"] = round(time.time() - start, 1)
        worked += time.time() - start
        if rank == 0:
            append_row(status_file, entry)
        ran = counts["done"] + counts["failed"]
        left = len(points) - i - 1
        eta = f", about {_fmt(worked / ran * left)} left" if ran and left else ""
        log(f"sweep progress: {i + 1}/{len(points)} points ({counts['done']} run, {counts['skipped']} skipped, "
            f"{counts['failed']} failed), {_fmt(time.time() - t0)} elapsed{eta}")
    log(f"sweep finished: {counts['done']} run, {counts['skipped']} skipped, {counts['failed']} failed of "
        f"{len(points)}; rows in {cfg.results_file}")
    return {**counts, "failures": failed}


def describe(cfg: DictConfig, only: list[str] | None = None) -> list[str]:
    """One line per point with its state (for ``fusionbench sweep --dry-run``)."""
    done = finished_stages(cfg.results_file)
    lines = []
    for i, (label, point) in enumerate(select(grid_points(cfg), only)):
        h = config_hash(point)
        have = done.get(h, set())
        left = [s for s in stage_plan(point) if s.name not in have]
        state = "done" if not left else (f"partial ({', '.join(sorted(have))})" if have else "todo")
        if left:
            state += _checkpoint_state(point, left[0])
        lines.append(f"{i + 1:3d}  {json.dumps(label, default=str)}  seed={point.seed}  {h}  {state}")
    return lines


def _checkpoint_state(point: DictConfig, stage: DictConfig) -> str:
    """Where an unfinished point's next stage stands on this machine's disk: its newest Lightning
    checkpoint (the sweep continues from it), or nothing when it has none."""
    ckpt = stage_checkpoint(run_dir_of(point), stage.name)
    step = checkpoint_step(ckpt)
    if step is None:
        return ""
    target = checkpoint_target(ckpt, stage)  # a compute-matched stage's steps follow from its budget
    if target is None:
        return f" ({stage.name}: checkpoint at step {step} of a compute-matched stage; resumes there if unfinished)"
    if step >= target:
        return f" ({stage.name}: trained, {step} steps; evaluation left)"
    return f" ({stage.name}: checkpoint at step {step} of {target}; resumes there)"
