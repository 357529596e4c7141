"""Command line: ``fusionbench {run,sweep,train,eval,assets,report,power,text-tasks,results,list}``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fusionbench.errors import FusionBenchError


def _cmd_run(args, evaluate: bool = True) -> None:
    from fusionbench.config import load_config
    from fusionbench.runner import run

    cfg = load_config(args.config, args.overrides)
    rows = run(cfg, evaluate=evaluate)
    if evaluate:
        print(f"{len(rows)} result row(s) appended to {cfg.results_file}")


def _cmd_sweep(args) -> int:
    from fusionbench.config import load_config
    from fusionbench.sweep import describe, sweep

    cfg = load_config(args.config, args.overrides, only=args.only)
    if args.dry_run:
        for line in describe(cfg, args.only):
            print(line)
        return 0
    result = sweep(cfg, args.only)
    return 1 if result["failed"] else 0


def _cmd_results(args) -> int:
    from pathlib import Path

    from fusionbench.results import check

    files = args.files or sorted(str(p) for p in Path("results").glob("*.jsonl"))
    status = 0
    for f in files:
        r = check(f, repair=args.repair)
        bad = r["corrupt_lines"]
        what = ("ok" if not bad else f"{len(bad)} corrupt line(s): {', '.join(map(str, bad[:10]))}"
                + (f" -> moved to {f}.corrupt" if r["repaired"] else " (--repair moves them out)"))
        print(f"{f}: {r['rows']} rows, {what}")
        status = status or (1 if bad and not r["repaired"] else 0)
    return status


def _cmd_eval(args) -> None:
    from fusionbench.runner import evaluate_run

    evaluate_run(args.run_dir, args.overrides, stage=args.stage, results_file=args.results_file,
                 allow_partial=args.allow_partial)


def _cmd_assets(args) -> None:
    from fusionbench.assets.catalog import describe, prepare

    if args.prepare is not None:
        prepare(args.prepare)
    for line in describe():
        print(line)


def _cmd_report(args) -> None:
    from fusionbench.report import report, sync_readme

    results = args.results or ["results"]
    paper = args.paper
    if paper is None:
        paper = "paper" if [Path(r).resolve() for r in results] == [Path("results").resolve()] else "paper/local"
    for path in report(results, paper):
        print(path)
    readme = args.readme if args.readme is not None else ("README.md" if Path(paper) == Path("paper") else "")
    if readme and Path(readme).exists() and sync_readme(readme, Path(paper) / "tables"):
        print(readme)


def _cmd_power(args) -> None:
    from fusionbench.power import write_power

    study = args.study if args.study is not None else ("experiments/main.yaml" if Path("experiments/main.yaml").exists() else None)
    print(write_power(args.pilot, args.out, target=args.mde, tol=args.tol, study=study or None))


def _cmd_text_tasks(args) -> None:
    import json

    from omegaconf import OmegaConf

    from fusionbench.assets.lm import load_lm
    from fusionbench.config import LMConfig
    from fusionbench.evaluation.task_selection import (CANDIDATES, GEN_CANDIDATES, MARGIN, MIN_ITEMS,
                                                       score_candidates, score_generative_candidates)
    from fusionbench.results import append_row, code_hash, git_sha, provenance

    git_sha(), code_hash()
    lm_cfg = OmegaConf.merge(OmegaConf.structured(LMConfig), {"source": args.lm})
    lm, tok = load_lm(lm_cfg, seed=0)
    say = lambda m: print(m, flush=True)  # noqa: E731
    rows = []
    if args.tasks is None or args.tasks:
        rows += score_candidates(lm, tok, args.tasks or list(CANDIDATES), args.formats, n_items=args.n, log=say)
    if args.gen_tasks is None or args.gen_tasks:
        rows += score_generative_candidates(lm, tok, args.gen_tasks or list(GEN_CANDIDATES), args.gen_formats,
                                            n_items=args.n, log=say)
    for row in rows:
        rule = (f"n >= {MIN_ITEMS}, exact match >= {MARGIN}" if row.get("kind") == "generative"
                else f"n >= {MIN_ITEMS}, acc >= chance + {MARGIN}, acc > acc_first")
        append_row(args.out, {"benchmark": "text_task_selection", "lm": args.lm, "kind": "multiple_choice",
                              "rule": rule, **row,
                              **provenance(), "args": json.dumps(vars(args), default=str)})
    kept = [(r["task"], r["format"]) for r in rows if r.get("keep")]
    print(f"{len(kept)} kept: {kept}; rows appended to {args.out}")


def _cmd_list(args) -> None:
    from fusionbench.data import DATASETS
    from fusionbench.fusion import FUSIONS
    from fusionbench.plugins import load_plugins

    load_plugins(args.plugin)
    print("fusion strategies:", ", ".join(FUSIONS.names()))
    print("datasets:", ", ".join(DATASETS.names()))
    for reg in (FUSIONS, DATASETS):
        for module, why in reg.broken.items():
            print(f"fusionbench: warning: {module} failed to import, so its {reg.kind} is missing: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusionbench", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "assets -> train -> evaluate -> one results row per stage"),
                        ("train", "train (and checkpoint) only; no evaluation, no results row")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. fusion=mlp trainer.max_steps=200 (not of a key the "
                       "config's grid sets: the grid's value would win; refused)")
    p = sub.add_parser("sweep", help="every grid point x seed, skipping finished ones, resuming killed ones, "
                                      "going on past failures")
    p.add_argument("config", help="experiment YAML with a grid and/or seeds, e.g. experiments/main.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides")
    p.add_argument("--dry-run", action="store_true", help="list the points and which are finished; run nothing")
    p.add_argument("--only", action="append", metavar="LABEL",
                   help="only the points with this label (a variant's label or a grid value); repeatable")
    p = sub.add_parser("eval", help="evaluate a trained run directory again (new measurements); appends a row")
    p.add_argument("run_dir", help="a run directory: <output_dir>/<experiment>/<strategy>-<hash>-s<seed>")
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.mm_items=400")
    p.add_argument("--stage", default=None, help="which stage's checkpoint (default: the last stage)")
    p.add_argument("--results-file", default=None, help="table to append to (default: the run's results_file)")
    p.add_argument("--allow-partial", action="store_true",
                   help="evaluate a checkpoint from before the stage's last step (the row records its real step)")
    p = sub.add_parser("assets", help="list the backbones and data files, and prepare them")
    p.add_argument("--prepare", nargs="*", metavar="ASSET", help="prepare these (no name: all embedded defaults)")
    p = sub.add_parser("report", help="figures and LaTeX tables in paper/ from the tables in results/")
    p.add_argument("--results", action="append", default=None, metavar="DIR",
                   help="folder of *.jsonl result tables (default: results, the committed reference "
                        "rows); repeat to report several together, e.g. --results results --results "
                        "results/local (your runs, labelled '(local)')")
    p.add_argument("--paper", default=None, help="output folder (figures/, tables/); paper/ holds the committed "
                                                 "ones, paper/local/ is git-ignored (default: paper for the "
                                                 "committed results/ alone, else paper/local, so other rows "
                                                 "never overwrite the committed tables by accident)")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="rewrite this file's '<!-- report: NAME.md -->' blocks with the tables just written "
                        "(default: README.md when --paper is paper, the committed tables; '': none)")
    p = sub.add_parser("power", help="from a pilot's rows: the step budget, the noise and the minimum "
                                     "detectable effect of the study (fusionbench.power) -> results/power.md")
    p.add_argument("--pilot", default="results/pilot.jsonl", help="the pilot's results table (default: results/pilot.jsonl)")
    p.add_argument("--out", default="results/power.md", help="Markdown file to write (default: results/power.md, the committed one)")
    p.add_argument("--mde", type=float, default=0.05, help="the difference the study must detect (default: 0.05)")
    p.add_argument("--tol", type=float, default=0.02, help="budget: first step within this of the best val accuracy (default: 0.02)")
    p.add_argument("--study", default=None,
                   help="the study config whose test items and seeds the MDE is computed for (default: "
                        "experiments/main.yaml where it exists; '': none)")
    p = sub.add_parser("text-tasks", help="score the base LM on candidate BIG-bench tasks and formats; keep those "
                                          "that can detect forgetting (fusionbench.evaluation.task_selection)")
    p.add_argument("--lm", default="smollm2", help="lm.source of the base LM")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="multiple-choice BIG-bench tasks (default: the built-in candidates; empty: none)")
    p.add_argument("--gen-tasks", nargs="*", default=None,
                   help="generative BIG-bench tasks (default: the built-in candidates; empty: none)")
    p.add_argument("--formats", nargs="*", default=["bigbench", "plain"], help="prompt formats to try")
    p.add_argument("--gen-formats", nargs="*", default=["bigbench", "plain", "fewshot"],
                   help="prompt formats to try on the generative tasks (fewshot: BIG-bench's 3-shot layout)")
    p.add_argument("--n", type=int, default=200, help="items per task (at most)")
    p.add_argument("--out", default="results/local/text_task_selection.jsonl", help="table to append to")
    p = sub.add_parser("results", help="results tables: `check` counts rows and corrupt lines (--repair moves them out)")
    p = p.add_subparsers(dest="action", required=True).add_parser("check", help="rows and corrupt lines of each table")
    p.add_argument("files", nargs="*", help="results tables (default: results/*.jsonl)")
    p.add_argument("--repair", action="store_true", help="move corrupt lines to <file>.corrupt, keep the rest")
    p = sub.add_parser("list", help="list registered fusion strategies and datasets")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import this plugin first (as a config's plugins: [...]); repeatable")
    # dotlist overrides may also follow an option (`sweep CONFIG --only mlp seeds=[0]`), which plain
    # parse_args refuses once an option has closed the positional list; anything else stays an error
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if not hasattr(args, "overrides") or e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.cmd == "run":
            _cmd_run(args)
        elif args.cmd == "train":
            _cmd_run(args, evaluate=False)
        elif args.cmd == "sweep":
            return _cmd_sweep(args)
        elif args.cmd == "eval":
            _cmd_eval(args)
        elif args.cmd == "assets":
            _cmd_assets(args)
        elif args.cmd == "report":
            _cmd_report(args)
        elif args.cmd == "text-tasks":
            _cmd_text_tasks(args)
        elif args.cmd == "power":
            _cmd_power(args)
        elif args.cmd == "results":
            return _cmd_results(args)
        elif args.cmd == "list":
            _cmd_list(args)
    except FusionBenchError as e:
        print(f"fusionbench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
