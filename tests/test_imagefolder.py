"""data.name: imagefolder: a researcher's own images and questions, through the same splits,
training and choice scoring as the built-in sources; bad images are one line naming the file."""
from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from fusionbench.cli import main
from fusionbench.config import load_config
from fusionbench.data import DATASETS
from fusionbench.errors import FusionBenchError
from fusionbench.results import read_rows
from tests.helpers import TINY

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _folder(tmp_path, n=90, fmt="jsonl"):
    root = tmp_path / "mydata"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        Image.new("RGB", (40, 40), COLOURS[name]).save(root / "img" / f"{i:03d}.png")
        rows.append({"image": f"img/{i:03d}.png", "question": "What colour is the picture?", "answer": name,
                     "candidates": sorted(COLOURS), "qtype": "colour"})
    if fmt == "jsonl":
        (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["image,question,answer,candidates,qtype"] + [
            f"{r['image']},{r['question']},{r['answer']},{'|'.join(r['candidates'])},{r['qtype']}" for r in rows]
        (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    return root


def _cfg(root, *extra):
    return load_config(TINY, ["data.name=imagefolder", f"data.options.path={root}", "data.train_size=1000",
                              "data.val_size=1000", "data.test_size=1000", *extra])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_splits_by_image_balanced_test_with_choices(tmp_path, fmt):
    root = _folder(tmp_path, fmt=fmt)
    cfg = _cfg(root, *(["data.options.annotations=annotations.csv"] if fmt == "csv" else []))
    splits = {s: DATASETS.get("imagefolder")(cfg.data, s) for s in ("train", "val", "test")}
    images = {s: {x["path"] for x in d.cast_column("image", datasets.Image(decode=False))["image"]}
              for s, d in splits.items()}
    assert sum(len(d) for d in splits.values()) <= 90 and all(len(d) for d in splits.values())
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    test = splits["test"]
    counts = {a: test["answer"].count(a) for a in COLOURS}
    assert len(set(counts.values())) == 1  # balanced: every gold answer equally often
    assert all(c == sorted(COLOURS) for c in test["choices"]) and set(test["qtype"]) == {"colour"}
    assert splits["train"][0]["image"].size == (40, 40)


def test_runs_end_to_end_and_writes_a_choice_scored_row(tmp_path):
    root = _folder(tmp_path)
    assert main(["run", str(TINY), "data.name=imagefolder", f"data.options.path={root}", "data.train_size=1000",
                 "data.val_size=1000", "data.test_size=1000", f"output_dir={tmp_path / 'runs'}",
                 f"results_file={tmp_path / 'r.jsonl'}"]) == 0
    [row] = read_rows(tmp_path / "r.jsonl")
    assert row["data"] == "imagefolder" and 0 <= row["mm/choice/acc"] <= 1
    assert row["mm/choice/colour/n"] > 0 and abs(row["mm/choice/chance"] - 1 / 3) < 1e-9


def test_a_broken_image_is_one_line_naming_the_file_or_skipped_with_a_count(tmp_path, capsys):
    root = _folder(tmp_path)
    cfg = _cfg(root)
    train = DATASETS.get("imagefolder")(cfg.data, "train")
    rows = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]
    from fusionbench.data.sources.imagefolder import _split_of
    bad = next(r["image"] for r in rows if _split_of(r["image"]) == "train")
    (root / bad).write_bytes((root / bad).read_bytes()[:40])  # truncated
    with pytest.raises(FusionBenchError, match=rf"{bad}: not a readable image.*bad_images=skip"):
        DATASETS.get("imagefolder")(cfg.data, "train")
    skipping = _cfg(root, "data.options.bad_images=skip")
    kept = DATASETS.get("imagefolder")(skipping.data, "train")
    assert len(kept) == len(train) - 1
    assert "skipped 1 question(s) on 1 unreadable image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"options.path": ""}, "needs data.options.path"),
    ({"options.annotations": "nope.jsonl"}, "no annotations file"),
    ({"options.bad_images": "ignore"}, "must be 'fail' or 'skip'"),
])
def test_bad_options_are_clear_errors(tmp_path, change, message):
    root = _folder(tmp_path, n=12)
    overrides = [f"data.{k}={v}" for k, v in change.items()]
    cfg = _cfg(root, *overrides)
    with pytest.raises(FusionBenchError, match=message):
        DATASETS.get("imagefolder")(cfg.data, "train")


def test_an_answer_outside_its_candidates_is_refused(tmp_path):
    root = _folder(tmp_path, n=30)
    rows = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]
    for r in rows:
        r["candidates"] = ["cyan", "magenta"]
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FusionBenchError, match=r"item 1 of the annotations \(counting from 1.*is not among its "
                                               r"candidates \['cyan', 'magenta'\]"):
        DATASETS.get("imagefolder")(_cfg(root).data, "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_items_without_candidates_rank_their_question_types_answers(tmp_path, fmt):
    """null / missing / empty candidates on some items: those items take every answer of their
    question type (as a file without the column does), the others keep their own."""
    from fusionbench.evaluation.choice import item_choices

    root = _folder(tmp_path, n=40, fmt=fmt)
    own = sorted(COLOURS) + ["purple"]  # differs from the type's answers, so a mix-up shows
    if fmt == "jsonl":
        rows = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):
            if i % 4 == 0:
                r["candidates"] = None
            elif i % 4 == 1:
                del r["candidates"]
            elif i % 4 == 2:
                r["candidates"] = []
            else:
                r["candidates"] = own
        (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = (root / "annotations.csv").read_text().splitlines()
        cells = [line.split(",") for line in lines[1:]]
        lines = [lines[0]] + [",".join(c[:3] + ["" if i % 2 == 0 else "|".join(own), c[4]]) for i, c in enumerate(cells)]
        (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg(root, *(["data.options.annotations=annotations.csv"] if fmt == "csv" else []))
    ds = DATASETS.get("imagefolder")(cfg.data, "train")  # the largest split: items with and without
    assert any(c == [] for c in ds["choices"]) and any(c == own for c in ds["choices"])
    choices, source = item_choices(ds)
    assert source == "mixed"
    assert all(got == (c or sorted(COLOURS)) for got, c in zip(choices, ds["choices"]))  # never ['None']


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_annotations_file_is_one_clear_error(tmp_path, content):
    root = _folder(tmp_path, n=3)
    (root / "annotations.jsonl").write_text(content)
    with pytest.raises(FusionBenchError, match=r"annotations.jsonl is empty"):
        DATASETS.get("imagefolder")(_cfg(root).data, "train")


def test_an_over_long_choice_candidate_is_refused_before_training(tmp_path, capsys):
    """Choice scoring appends each candidate where the answer goes, so a candidate longer than
    trainer.max_length allows is one error naming the example before any step (it used to pass
    the length check, train, and crash in choice scoring with an IndexError, writing no row)."""
    root = _folder(tmp_path, n=30)
    rows = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]
    long = "very " * 400 + "long"
    for r in rows:
        r["candidates"] = sorted(COLOURS) + [long]
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["run", str(TINY), "data.name=imagefolder", f"data.options.path={root}", "data.train_size=1000",
               "data.val_size=1000", "data.test_size=1000", f"output_dir={tmp_path / 'runs'}",
               f"results_file={tmp_path / 'r.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "longest choice candidate" in err and "over trainer.max_length" in err
    assert "(2" in err and "characters)" in err  # the 2000-character example is shortened, not quoted whole
    assert "stage main: training" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_contrasts_power_is_checked_on_the_test_items_the_folder_really_gives(tmp_path, capsys):
    """For a folder dataset data.test_size is only a cap (the README's example says 100000) and the
    balanced test split drops items: a contrast's stated MDE is checked again on the split as built,
    before any training, and the balancing says how many items it kept."""
    root = _folder(tmp_path, n=90)
    rows = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["answer"] = "red" if i % 6 else "green"  # mostly red: balancing keeps few test items
    (root / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    contrast = "contrasts=[{a: mlp, b: blind, mde: 0.05}]"
    assert load_config(TINY, ["data.name=imagefolder", f"data.options.path={root}", "data.test_size=100000",
                              contrast]).contrasts  # the cap alone passes the config check
    rc = main(["run", str(TINY), "data.name=imagefolder", f"data.options.path={root}", "data.train_size=1000",
               "data.val_size=1000", "data.test_size=100000", contrast, f"output_dir={tmp_path / 'runs'}",
               f"results_file={tmp_path / 'r.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "contrasts[0] (mlp - blind): detecting a difference of 0.05" in err
    assert "the test split as built has" in err, err
    assert "items kept" in err, err
    assert "stage main: training" not in err and not (tmp_path / "r.jsonl").exists()
