"""The results store: concurrent appends lose nothing, a kill mid-append never poisons the table,
corrupt lines are named (file and line) and repaired, a read-only results folder fails before any
compute."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest

from fusionbench.cli import main
from fusionbench.errors import FusionBenchError
from fusionbench.results import append_row, check, read_results, read_rows
from tests.helpers import ROOT


def _writer(path: str, proc: int, n: int) -> None:
    for i in range(n):
        append_row(path, {"proc": proc, "i": i, "payload": "x" * (100 + 37 * i % 4000)})


def test_concurrent_appends_lose_no_row(tmp_path):
    """6 processes x 60 appends to one table: all 360 rows, each once, every line whole
    (the rename-based append this replaced lost 88-98 of 200)."""
    path = str(tmp_path / "res.jsonl")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 60)) for p in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = read_rows(path)
    assert sorted((r["proc"], r["i"]) for r in rows) == [(p, i) for p in range(6) for i in range(60)]
    assert check(path)["corrupt_lines"] == []


def test_kill_during_appends_leaves_a_readable_table(tmp_path):
    """A real SIGKILL while a process appends large rows as fast as it can: every complete row
    stays readable, at most a partial last line is skipped, and the next append moves it out."""
    path = tmp_path / "res.jsonl"
    code = ("import sys; from fusionbench.results import append_row\n"
            "i = 0\n"
            "while True:\n"
            "    append_row(sys.argv[1], {'i': i, 'payload': 'y' * 2_000_000}); i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and (not path.exists() or path.stat().st_size < 5_000_000):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = read_rows(path)
    assert rows and [r["i"] for r in rows] == list(range(len(rows)))
    append_row(path, {"i": "after"})
    assert [r["i"] for r in read_rows(path)][-1] == "after" and check(path)["corrupt_lines"] == []


def test_partial_last_line_is_skipped_then_moved_aside(tmp_path, capsys):
    path = tmp_path / "res.jsonl"
    append_row(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"a": 2, "b": "cut sho')  # what a kill mid-write leaves
    assert [r["a"] for r in read_rows(path)] == [1]
    assert "res.jsonl:2: skipping a partial last line" in capsys.readouterr().err
    append_row(path, {"a": 3})
    assert [r["a"] for r in read_rows(path)] == [1, 3]
    assert (tmp_path / "res.jsonl.corrupt").read_text().startswith('{"a": 2, "b": "cut sho')
    assert list(read_results(path).a) == [1, 3]


def test_wide_table_reads_with_integer_columns_and_unfragmented(tmp_path):
    # a result row has hundreds of columns (per-template metrics); reading converted them one by
    # one, which left the frame so fragmented that every later insert warned (report.load_all)
    path = tmp_path / "res.jsonl"
    for i in range(2):
        append_row(path, {"items": "0110", "ratio": 0.5 + i, **{f"n{k}": float(k + i) for k in range(300)}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        df = read_results(path).assign(table="res", origin="")
    assert df["n7"].dtype == "int64" and list(df["n7"]) == [7, 8]
    assert df["ratio"].dtype == float and df["items"].tolist() == ["0110", "0110"]


def test_corrupt_line_mid_file_is_an_error_naming_file_and_line_and_check_repairs_it(tmp_path, capsys):
    path = tmp_path / "res.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, oops\n{"a": 3}\n')
    with pytest.raises(FusionBenchError, match=r"res.jsonl:2: not a JSON row.*results check --repair.* to res\.jsonl\.corrupt$"):
        read_results(path)
    assert main(["results", "check", str(path)]) == 1
    assert "2 rows, 1 corrupt line(s): 2" in capsys.readouterr().out
    assert main(["results", "check", "--repair", str(path)]) == 0
    assert [r["a"] for r in read_rows(path)] == [1, 3]
    assert "res.jsonl:2" in (tmp_path / "res.jsonl.corrupt").read_text()
    assert main(["results", "check", str(path)]) == 0


def test_results_check_never_repairs_a_file_that_is_not_a_table(tmp_path, capsys):
    """`results check --repair README.md` would have moved every line of it out as "corrupt"."""
    readme = tmp_path / "README.md"
    readme.write_text("# notes\nsome text\n")
    assert main(["results", "check", "--repair", str(readme)]) == 2
    assert "is not a results table (those are *.jsonl)" in capsys.readouterr().err
    csvlike = tmp_path / "res.jsonl"
    csvlike.write_text("a,b\n1,2\n")
    assert main(["results", "check", str(csvlike)]) == 1  # checked: 2 corrupt lines
    assert main(["results", "check", "--repair", str(csvlike)]) == 2
    assert "none of its 2 lines is a row" in capsys.readouterr().err
    assert readme.read_text() == "# notes\nsome text\n" and csvlike.read_text() == "a,b\n1,2\n"
    assert not list(tmp_path.glob("*.corrupt"))


def test_a_whole_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "res.jsonl"
    path.write_text(json.dumps({"a": 1}))  # edited by hand, no final newline
    append_row(path, {"a": 2})
    assert [r["a"] for r in read_rows(path)] == [1, 2] and not (tmp_path / "res.jsonl.corrupt").exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_unwritable_results_file_fails_before_training(tmp_path, capsys, where):
    """(A path under a regular file, or a folder: unwritable even for root, which CI may be.)"""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "afolder.jsonl").mkdir()
    target = tmp_path / "afile" / "res.jsonl" if where == "under_a_file" else tmp_path / "afolder.jsonl"
    code = main(["run", str(ROOT / "tests" / "tiny.yaml"), f"output_dir={tmp_path / 'runs'}", f"results_file={target}"])
    assert code == 2
    captured = capsys.readouterr()
    assert "is not writable" in captured.err and "nothing was trained" in captured.err
    assert "training" not in captured.err.split("is not writable")[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, content, message", [
    ("runs.csv", None, "must end in .jsonl"),
    ("table.jsonl", "strategy,acc\nmlp,0.5\n", "is not a fusionbench results table (none of its first 2 lines is "
                                                 "a JSON object; the first: 'strategy,acc')"),
    ("list.jsonl", "[1, 2]\n", "is not a fusionbench results table"),
])
def test_a_results_file_that_is_not_a_results_table_is_refused_and_left_alone(tmp_path, capsys, name, content, message):
    target = tmp_path / name
    if content is not None:
        target.write_text(content)
    code = main(["run", str(ROOT / "tests" / "tiny.yaml"), f"output_dir={tmp_path / 'runs'}", f"results_file={target}"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was trained" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert (target.read_text() if content is not None else None) == content  # untouched
    if content is None:
        assert not target.exists()


@pytest.mark.parametrize("content", ['{"strategy": "mlp", "se', 'garbled first line\n{"strategy": "mlp"}\n'])
def test_a_table_with_a_partial_or_damaged_line_is_still_appended_to(tmp_path, content):
    """A killed first write (a partial line) or one damaged line is the store's to handle, not a
    reason to refuse the table."""
    from fusionbench.results import check_writable

    target = tmp_path / "res.jsonl"
    target.write_text(content)
    check_writable(target)
    assert target.read_text() == content


def test_a_dangling_symlink_to_a_table_survives_the_check_and_rows_reach_its_target(tmp_path):
    """A study worktree reaches main's tables through symlinks. When the target does not exist yet,
    the check must remove the file it created at the target, never the link: otherwise the rows
    land in a new file beside the link, not in the table the link names."""
    from fusionbench.results import check_writable

    (tmp_path / "main").mkdir()
    (tmp_path / "wt").mkdir()
    target = tmp_path / "main" / "res.jsonl"
    link = tmp_path / "wt" / "res.jsonl"
    link.symlink_to(os.path.relpath(target, link.parent))  # relative, as a worktree's links are
    check_writable(link)
    assert link.is_symlink() and not target.exists()  # checked, not created; the link kept
    append_row(link, {"strategy": "mlp", "seed": 0})
    assert link.is_symlink()
    assert [r["strategy"] for r in read_rows(target)] == ["mlp"]


def test_repair_through_a_symlink_rewrites_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "res.jsonl"
    target.write_text('{"strategy": "mlp"}\ngarbled\n{"strategy": "lora"}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(FusionBenchError) as err:
        read_rows(link)
    assert str(err.value).endswith(f"moves corrupt lines to {os.path.realpath(target)}.corrupt")  # where repair puts them
    out = check(link, repair=True)
    assert out["repaired"] and out["corrupt_lines"] == [2]
    assert link.is_symlink()
    assert [r["strategy"] for r in read_rows(target)] == ["mlp", "lora"]
    assert "garbled" in (tmp_path / "res.jsonl.corrupt").read_text()


def test_a_partial_tail_reached_through_a_symlink_goes_beside_the_target(tmp_path):
    """One place for a table's corrupt lines: beside the table itself, also when a writer reaches it
    through a link (and the link stays a link)."""
    (tmp_path / "main").mkdir()
    (tmp_path / "wt").mkdir()
    target = tmp_path / "main" / "res.jsonl"
    target.write_text('{"strategy": "mlp"}\n{"strategy": "lo')
    link = tmp_path / "wt" / "res.jsonl"
    link.symlink_to(os.path.relpath(target, link.parent))
    append_row(link, {"strategy": "lora"})
    assert link.is_symlink() and not (tmp_path / "wt" / "res.jsonl.corrupt").exists()
    assert (tmp_path / "main" / "res.jsonl.corrupt").read_text() == '{"strategy": "lo\n'
    assert [r["strategy"] for r in read_rows(target)] == ["mlp", "lora"]


def test_a_symlink_loop_as_results_file_is_one_clear_error(tmp_path):
    from fusionbench.results import check_writable

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(FusionBenchError, match="not writable"):
        check_writable(a)
    assert a.is_symlink() and b.is_symlink()
