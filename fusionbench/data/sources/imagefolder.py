"""Your own images and questions: ``data.name: imagefolder``.

A folder of images plus one annotations file (JSON Lines or CSV, read with ``datasets``), one row per
question::

    {"image": "cats/001.jpg", "question": "How many cats are there?", "answer": "2",
     "candidates": ["0", "1", "2", "3"], "qtype": "count"}

``image`` is a path relative to the folder; ``candidates`` (optional; a list, or ``|``-separated in
CSV) are what choice scoring ranks (without them: every answer of the same ``qtype``); ``qtype``
(optional, default ``question``) groups the per-type accuracies; ``split`` (optional: train / val /
test) pins an item to a split, else the image's file name decides (a stable hash: every question
about one image lands in the same split, so no image is both trained on and tested).

Options (``data.options``): ``path`` (the folder, required), ``annotations`` (file name in it,
default ``annotations.jsonl``), ``bad_images`` (``fail``: one error naming the first file that is
missing, truncated or not an image; ``skip``: leave its questions out and say how many),
``balance_test`` (default true: within each question type the test split keeps the same number of
items for every gold answer, so a question-blind guesser scores chance, as in the built-in sources).
``data.<split>_size`` caps each split (items are taken in a seeded order)."""
from __future__ import annotations

import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import datasets

from fusionbench.data import register_dataset
from fusionbench.data.sources.scenes import check_options, plain, split_rng
from fusionbench.errors import FusionBenchError, first_line

NAME = "imagefolder"
DEFAULTS = {"path": "", "annotations": "annotations.jsonl", "bad_images": "fail", "balance_test": True}
SPLITS = ("train", "val", "test")


def _split_of(image: str) -> str:
    bucket = zlib.crc32(Path(image).name.encode()) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def _image_problem(path: Path) -> str | None:
    from PIL import Image

    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as img:
            img.load()  # decodes every pixel: a truncated file fails here, not mid-training
    except Exception as e:  # PIL raises many kinds
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def _read(folder: Path, annotations: str) -> datasets.Dataset:
    file = folder / annotations
    if not file.is_file():
        raise FusionBenchError(f"dataset {NAME!r}: no annotations file {file} (data.options.annotations)")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(file.suffix.lower())
    if kind is None:
        raise FusionBenchError(f"dataset {NAME!r}: {file.name} must be .jsonl or .csv")
    if not file.read_text(errors="replace").strip():
        raise FusionBenchError(f"dataset {NAME!r}: {file} is empty (one item per line: image, question, answer)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as e:
        raise FusionBenchError(f"dataset {NAME!r}: cannot read {file}: {first_line(e)}") from None
    missing = {"image", "question", "answer"} - set(ds.column_names)
    if missing:
        raise FusionBenchError(f"dataset {NAME!r}: {file.name} lacks the columns {sorted(missing)} "
                               f"(has {ds.column_names})")
    return ds


@register_dataset(NAME)
def build_imagefolder(cfg: Any, split: str) -> datasets.Dataset:
    if split not in SPLITS:
        raise FusionBenchError(f"dataset {NAME!r}: unknown split {split!r}")
    opts = check_options(cfg, NAME, DEFAULTS)
    if not opts["path"]:
        raise FusionBenchError(f"dataset {NAME!r} needs data.options.path: the folder of your images")
    if opts["bad_images"] not in ("fail", "skip"):
        raise FusionBenchError(f"data.options.bad_images must be 'fail' or 'skip', got {opts['bad_images']!r}")
    folder = Path(opts["path"]).expanduser().resolve()
    ds = _read(folder, opts["annotations"])
    cols = ds.column_names
    qtypes = [str(q) for q in ds["qtype"]] if "qtype" in cols else ["question"] * len(ds)
    wanted = [str(q) for q in (plain(cfg.qtypes) or [])]
    unknown = sorted(set(wanted) - set(qtypes))
    if unknown:
        raise FusionBenchError(f"dataset {NAME!r}: data.qtypes keeps {unknown}, which no item has "
                               f"(its types: {sorted(set(qtypes))})")
    splits = [str(s) for s in ds["split"]] if "split" in cols else [_split_of(str(i)) for i in ds["image"]]
    bad_split = sorted(set(splits) - set(SPLITS))
    if bad_split:
        raise FusionBenchError(f"dataset {NAME!r}: column 'split' has {bad_split}; use train, val or test")
    rows = [i for i in range(len(ds)) if splits[i] == split and (not wanted or qtypes[i] in wanted)]

    checked: dict[str, str | None] = {}
    keep, skipped = [], Counter()
    for i in rows:
        image = str(ds[i]["image"])
        if image not in checked:
            checked[image] = _image_problem(folder / image)
        if checked[image] is None:
            keep.append(i)
        elif opts["bad_images"] == "fail":
            raise FusionBenchError(f"dataset {NAME!r}: {folder / image}: {checked[image]} (fix or remove it, or set "
                                   "data.options.bad_images=skip to leave its questions out)")
        else:
            skipped[image] += 1
    if skipped:
        print(f"[fusionbench] {NAME} {split}: skipped {sum(skipped.values())} question(s) on {len(skipped)} "
              f"unreadable image(s), e.g. {next(iter(skipped))}", file=sys.stderr, flush=True)

    answers = [str(a) for a in ds["answer"]]
    if split == "test" and opts["balance_test"]:
        before = len(keep)
        keep = _balanced(keep, [qtypes[i] for i in keep], [answers[i] for i in keep], cfg.seed)
        if len(keep) < before:
            print(f"[fusionbench] {NAME} test: balanced (every gold answer of a question type equally often, "
                  f"data.options.balance_test): {len(keep)} of {before} items kept", file=sys.stderr, flush=True)
    order = split_rng(cfg.seed, split, NAME).permutation(len(keep))
    size = int({"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split])
    keep = sorted(keep[j] for j in order[:size])
    if not keep:
        raise FusionBenchError(f"dataset {NAME!r}: the {split} split of {folder / opts['annotations']} is empty "
                               "(add items, or pin some with a 'split' column)")
    out = {"image": [str(folder / str(ds[i]["image"])) for i in keep],
           "question": [str(ds[i]["question"]) for i in keep], "answer": [answers[i] for i in keep],
           "qtype": [qtypes[i] for i in keep], "relation": [""] * len(keep), "caption": [""] * len(keep),
           "template": [qtypes[i] for i in keep]}
    features = {"image": datasets.Image(), **{k: datasets.Value("string") for k in out if k != "image"}}
    if "candidates" in cols:
        out["choices"] = [_candidates(ds[i]["candidates"], answers[i], i) for i in keep]
        features["choices"] = datasets.Sequence(datasets.Value("string"))
    return datasets.Dataset.from_dict(out, features=datasets.Features(features))


def _candidates(value: Any, answer: str, i: int) -> list[str]:
    """An item's candidates ([] where it has none: null, missing or empty, so choice scoring uses
    every answer of its question type); ``i`` is its 0-based row, reported as "item i + 1"."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
        return []
    found = [str(c) for c in value] if isinstance(value, list) else [c.strip() for c in str(value).split("|")]
    if answer not in found:
        raise FusionBenchError(f"dataset {NAME!r}: item {i + 1} of the annotations (counting from 1, a .csv's header "
                               f"not counted): the answer {answer!r} is not among its candidates {found}")
    return found


def _balanced(items: list[int], qtypes: list[str], answers: list[str], seed: int) -> list[int]:
    """Within each question type, the same number of items for every gold answer (the rarest
    answer's count), chosen with the seed."""
    by: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for item, q, a in zip(items, qtypes, answers):
        by[q][a].append(item)
    rng = split_rng(seed, "test", NAME + "-balance")
    out = []
    for q in sorted(by):
        n = min(len(v) for v in by[q].values())
        for a in sorted(by[q]):
            group = by[q][a]
            out += [group[j] for j in sorted(rng.permutation(len(group))[:n])]
    return sorted(out)
