"""Bad inputs and injected faults against the tiny tier -> results/robustness.md (generated; commit it).

Each bad input runs ``fusionbench run tests/tiny.yaml <overrides>`` in a fresh process and must
exit 2 with one ``fusionbench: error:`` line, no traceback and no results row. The faults are
SIGKILLs of real processes (a training run between checkpoints, appends to a results table) and
check that nothing finished is lost:

    .venv/bin/python scripts/robustness.py            # ~3 min on 2 cores
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

BAD = [
    ("unknown strategy", ["fusion=mpl"]), ("mistyped key", ["trainer.max_stpes=3"]),
    ("mistyped strategy option", ["fusion=lora", "fusion.dropotu=0.1"]), ("wrong type", ["trainer.max_steps=abc"]),
    ("lr negative", ["trainer.lr=-1"]), ("lr nan", ["trainer.lr=nan"]), ("lr inf", ["trainer.lr=inf"]),
    ("steps negative", ["trainer.max_steps=-5"]), ("steps zero", ["trainer.max_steps=0"]),
    ("batch zero", ["trainer.batch_size=0"]), ("devices banana", ["trainer.devices=banana"]),
    ("devices zero", ["trainer.devices=0"]), ("warmup > steps", ["trainer.warmup_steps=50"]),
    ("eval items negative", ["eval.mm_items=-3"]), ("train set < one batch", ["data.train_size=4"]),
    ("image size zero", ["data.image_size=0"]), ("empty test split", ["data.test_size=0"]),
    ("glued colon in a mapping", ["grid={fusion:[linear, mlp]}"]), ("unclosed list", ["seeds=[0,1"]),
    ("not key=value", ["trainer.max_steps"]), ("unknown dataset", ["data.name=imagenett"]),
    ("unknown question type", ["data.qtypes=[colour]"]), ("unknown evaluator", ["eval.metrics=[chioce]"]),
    ("stage of another strategy", ["fusion=mlp", "stages=[{name: upcycle}]"]),
    ("max_length over LM context", ["lm.tiny.max_position_embeddings=64", "trainer.max_length=128"]),
    ("max_length too small for prompts", ["trainer.max_length=16"]),
    ("results_file is a folder", ["results_file={tmp}"]),
    ("results_file under a file", ["results_file={tmp}/afile/r.jsonl"]),
    ("missing .gguf", ["lm.source={tmp}/missing.gguf"]), ("unknown hub LM offline", ["lm.source=someone/some-lm"]),
    ("imagefolder without path", ["data.name=imagefolder"]),
    ("layer out of range", ["fusion={name: visual_expert, layers: [0, 9]}"]),
]


def bad_inputs(tmp: Path) -> list[dict]:
    (tmp / "afile").write_text("x")
    out = []
    for what, overrides in BAD:
        res = tmp / "res.jsonl"
        args = [o.replace("{tmp}", str(tmp)) for o in overrides]
        if not any(a.startswith("results_file=") for a in args):
            args.append(f"results_file={res}")
        proc = subprocess.run([sys.executable, "-m", "fusionbench", "run", "tests/tiny.yaml", *args,
                               f"output_dir={tmp / 'runs'}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
        err = [line for line in proc.stderr.splitlines() if line.startswith("fusionbench: error:")]
        clean = proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr and not (
            res.exists() and res.stat().st_size)
        out.append({"input": what, "overrides": " ".join(overrides), "exit": proc.returncode, "clean": clean,
                    "message": err[0][len("fusionbench: error: "):] if err else proc.stderr.strip()[-200:]})
    return out


def kill_training(tmp: Path) -> dict:
    """SIGKILL a run between checkpoints, run it again: one row, steps = max_steps, resumed exactly."""
    res = tmp / "kill.jsonl"
    cmd = [sys.executable, "-m", "fusionbench", "run", "tests/tiny.yaml", "fusion=linear", "trainer.max_steps=400",
           "trainer.checkpoint_every_n_steps=20", f"output_dir={tmp / 'kruns'}", f"results_file={res}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp / "kruns").glob("**/last.ckpt")):
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    rows = [json.loads(line) for line in res.read_text().splitlines()] if res.exists() else []
    ok = again.returncode == 0 and len(rows) == 1 and rows[0]["steps"] == 400 and rows[0].get("resume_exact") is True
    return {"fault": "SIGKILL during training, then the same command", "rows_lost": 0 if ok else 1, "ok": ok,
            "detail": f"resumed from step {rows[0].get('resumed_from_step') if rows else None}, resume_exact "
                      f"{rows[0].get('resume_exact') if rows else None}"}


def kill_appends(tmp: Path, trials: int = 5) -> dict:
    """SIGKILL processes appending large rows, several times; then count what survived."""
    path = tmp / "appends.jsonl"
    code = ("import sys; from fusionbench.results import append_row\n"
            "i = 0\nwhile True:\n    append_row(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'y' * 500_000}); i += 1\n")
    for t in range(trials):
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"{t}.{k}"], cwd=ROOT, env=ENV) for k in range(2)]
        time.sleep(2.0 + 0.37 * t)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    from fusionbench.results import read_rows

    rows = read_rows(path)
    by = {}
    for r in rows:
        by.setdefault(r["w"], []).append(r["i"])
    gaps = sum(1 for v in by.values() if v != list(range(len(v))))
    return {"fault": f"SIGKILL of 2 concurrent appenders, {trials} times", "rows_lost": gaps, "ok": gaps == 0,
            "detail": f"{len(rows)} rows readable, every writer's rows consecutive from 0"}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bad = bad_inputs(tmp)
        faults = [kill_training(tmp), kill_appends(tmp)]
    lines = ["# Robustness: bad inputs and injected faults (generated by scripts/robustness.py)", "",
             f"{sum(b['clean'] for b in bad)} of {len(bad)} bad inputs give one clean error line before any "
             f"compute; {sum(f['rows_lost'] for f in faults)} rows lost in {len(faults)} fault scenarios.", "",
             "| bad input | overrides | exit | one clean line | message |", "|---|---|---|---|---|"]
    for b in bad:
        lines.append(f"| {b['input']} | `{b['overrides']}` | {b['exit']} | {'yes' if b['clean'] else '**no**'} | "
                     f"{b['message'].replace('|', '/')[:160]} |")
    lines += ["", "| fault | rows lost | ok | detail |", "|---|---|---|---|"]
    for f in faults:
        lines.append(f"| {f['fault']} | {f['rows_lost']} | {'yes' if f['ok'] else '**no**'} | {f['detail']} |")
    out = ROOT / "results" / "robustness.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
