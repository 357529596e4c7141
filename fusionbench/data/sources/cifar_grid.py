"""``cifar_grid``: 2x2 grids of real CIFAR-10 test images, with questions about them.

Source: the CIFAR-10 test set (10000 images, 32x32) that ships inside the ``bigbench==1.0.0``
sdist as ``*/cifar10_classification/base64/task.json`` (base64 PNGs). It is fetched through
:mod:`fusionbench.assets.pypi` once and decoded into a compact ``uint8`` cache,
``cache_dir("data", "cifar10_test")/cifar10_test_v1.npz`` (:func:`load_cifar10_test`); without a
registry and without the archive in the cache, :class:`~fusionbench.errors.AssetUnavailable`
says so.

The 10000 images are split disjointly, per class (the bigbench copy is sorted by class): test
draws from the last ``val_fraction`` of each class's images, val from the ``val_fraction`` before
that (``options.val_fraction``, default 0.2), train from the rest, so the splits never share a picture. Each grid tiles 4 images of 4 distinct classes (64x64 at 32 px each) and is
resized to ``cfg.image_size``. Answers are CIFAR class names (``airplane automobile bird cat deer
dog frog horse ship truck``), "yes"/"no", "top"/"bottom"/"left"/"right" or a digit.

Question templates (a few wordings each):

``spatial``
    "What is in the top left corner?" / "Which object is in the bottom right?" -> class;
    relation ``top_left`` / ``top_right`` / ``bottom_left`` / ``bottom_right`` (the cell asked).

    "What is to the left of (right of, above, below) the {class}?" -> class (only asked where
    that neighbour exists); relation ``left_of`` / ``right_of`` / ``above`` / ``below``.

    "Is the {class} at the top or the bottom?" -> "top"/"bottom" and "Is the {class} on the left
    or the right?" -> "left"/"right"; relation ``position``.
``attribute`` (relation ``""``)
    "Is there a {class} in the image?" -> "yes"/"no" (half each; the absent class is one not in
    the grid).
``count`` (relation ``""``)
    "How many animals are there?" / "How many vehicles are there?" -> "0".."4"; animals are
    bird cat deer dog frog horse, vehicles airplane automobile ship truck. Grids are drawn with
    the number of animals uniform over 0..4.

Every row names its ``template`` (``present``, ``count_animals``, ``count_vehicles``, ``cell``,
``neighbour``, ``position_v``, ``position_h``; :func:`templates`) and carries the template's closed
answer set as ``choices`` (choice scoring ranks them). As in ``scenes``, question types are
balanced exactly, templates take turns within a type, and the gold answers of each template take
turns over its answer set (:func:`~fusionbench.data.sources.scenes.answer_plan`; grids are drawn
until one fits), so a blind model scores chance per template. Options:
``questions_per_image`` (default 1) and ``val_fraction`` (default 0.2). The caption reads "A grid
with a ship at the top left, a cat at the top right, a frog at the bottom left and a truck at the
bottom right."

The grid/question logic is :func:`build_grids`, which takes the images and labels as arrays, so
it can run on any source (tests use small synthetic arrays).
"""
from __future__ import annotations

import ast
import base64
import io
import json
import os
from typing import Any, Callable, Iterator

import datasets
import numpy as np
from PIL import Image

from fusionbench.assets.paths import cache_dir
from fusionbench.assets.pypi import pypi_file
from fusionbench.data import register_dataset
from fusionbench.data.sources.scenes import (MAX_DRAWS, QA_FEATURES, Template, answer_plan, article,
                                             ask_group, cache_key, cached_dataset, check_options, join_phrases,
                                             png_bytes, qtype_plan, records_to_dataset, split_rng, split_size,
                                             wanted_qtypes)
from fusionbench.errors import FusionBenchError

NAME = "cifar_grid"
VERSION = "cifar_grid-v3"  # v2: a test pool; v3: answers balanced per template, template + choices columns
REQUIREMENT = "bigbench==1.0.0"
MEMBER = "*/cifar10_classification/base64/task.json"
CACHE_FILE = "cifar10_test_v1.npz"

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ANIMALS = frozenset({"bird", "cat", "deer", "dog", "frog", "horse"})
VEHICLES = frozenset(CLASSES) - ANIMALS
#: grid cells in tiling order: (row, col)
CELLS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}
DEFAULTS = {"questions_per_image": 1, "val_fraction": 0.2}


# --------------------------------------------------------------------------- the source images

def load_cifar10_test() -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test set: ``images`` uint8 [10000, 32, 32, 3] and ``labels`` int64 [10000]
    (indices into :data:`CLASSES`), decoded once from the bigbench sdist and cached as .npz."""
    path = cache_dir("data", "cifar10_test") / CACHE_FILE
    if path.exists():
        with np.load(path) as z:
            return z["images"], z["labels"]
    task = pypi_file(REQUIREMENT, MEMBER, sdist=True)
    images, labels = _decode_task(task.read_bytes())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, path)
    return images, labels


def _decode_task(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    examples = json.loads(raw)["examples"]
    images = np.empty((len(examples), 32, 32, 3), dtype=np.uint8)
    labels = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        scores = ex["target_scores"]
        if isinstance(scores, str):
            scores = ast.literal_eval(scores)
        hits = [name for name, v in scores.items() if v]
        if len(hits) != 1 or hits[0] not in CLASSES:
            raise FusionBenchError(f"CIFAR-10 task.json example {i}: unexpected target_scores {scores}")
        labels[i] = CLASSES.index(hits[0])
        with Image.open(io.BytesIO(base64.b64decode(ex["input"]))) as img:
            arr = np.asarray(img.convert("RGB"))
        if arr.shape != (32, 32, 3):
            raise FusionBenchError(f"CIFAR-10 task.json example {i}: image of shape {arr.shape}")
        images[i] = arr
    return images, labels


# --------------------------------------------------------------------------- grids

def split_pool(labels: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """Indices of the source images a split draws from: of every class's images (in source
    order), test takes the last ``val_fraction``, val the ``val_fraction`` before that, train the
    rest. Per class, because the bigbench copy of the test set is sorted by class (a plain
    head/tail cut would leave val with ships and trucks only)."""
    labels = np.asarray(labels)
    parts = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n = int(round(len(idx) * val_fraction))
        cut = {"train": slice(0, len(idx) - 2 * n), "val": slice(len(idx) - 2 * n, len(idx) - n),
               "test": slice(len(idx) - n, len(idx))}[split]
        parts.append(idx[cut])
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _cell_words(cell: str) -> str:
    return cell.replace("_", " ")


Grid = dict[str, str]  # cell -> class name
Instance = tuple[dict[str, Any], str, str]  # format fields, answer, relation


def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(0, len(items)))]


def _i_cell(grid: Grid) -> list[Instance]:
    return [({"c": _cell_words(cell)}, grid[cell], cell) for cell in CELLS]


_NEIGHBOURS = {  # relation -> (phrasings of it, offset of the answer cell from the reference cell)
    "left_of": (("to the left of", "left of"), (0, -1)),
    "right_of": (("to the right of", "right of"), (0, 1)),
    "above": (("above", "on top of"), (-1, 0)),
    "below": (("below", "under"), (1, 0)),
}


def _i_neighbour(grid: Grid) -> list[Instance]:
    out = []
    for ref, (r, c) in CELLS.items():
        for rel, (wordings, (dr, dc)) in _NEIGHBOURS.items():
            target = next((k for k, rc in CELLS.items() if rc == (r + dr, c + dc)), None)
            if target is not None:
                out.append(({"r": wordings, "x": grid[ref]}, grid[target], rel))
    return out


def _i_row(grid: Grid) -> list[Instance]:
    return [({"x": grid[cell]}, ("top", "bottom")[r], "position") for cell, (r, _) in CELLS.items()]


def _i_column(grid: Grid) -> list[Instance]:
    return [({"x": grid[cell]}, ("left", "right")[c], "position") for cell, (_, c) in CELLS.items()]


def _i_present(classes: list[str]) -> Callable[[Grid], list[Instance]]:
    def instances(grid: Grid) -> list[Instance]:
        return [({"a": article(x), "x": x}, "yes" if x in grid.values() else "no", "") for x in classes]
    return instances


def _i_count(kind: str, members: frozenset[str]) -> Callable[[Grid], list[Instance]]:
    def instances(grid: Grid) -> list[Instance]:
        return [({"k": kind}, str(sum(v in members for v in grid.values())), "")]
    return instances


def templates(classes: list[str]) -> dict[str, tuple[Template, ...]]:
    """The templates per question type; ``classes``: the CIFAR classes the split's pool has (the
    answer set of the class-valued templates)."""
    classes = tuple(classes)
    counts = tuple(str(i) for i in range(5))
    return {
        "attribute": (
            Template("present", "attribute", ("Is there {a} {x} in the image?", "Does the grid contain {a} {x}?",
                                              "Can you see {a} {x}?"), ("yes", "no"), _i_present(list(classes))),
        ),
        "count": (
            Template("count_animals", "count", ("How many {k} are there?", "How many {k} are in the grid?",
                                                "How many of the pictures show {k}?"), counts,
                     _i_count("animals", ANIMALS)),
            Template("count_vehicles", "count", ("How many {k} are there?", "How many {k} are in the grid?",
                                                 "How many of the pictures show {k}?"), counts,
                     _i_count("vehicles", VEHICLES)),
        ),
        "spatial": (
            Template("cell", "spatial", ("What is in the {c} corner?", "Which object is in the {c}?",
                                         "What do you see in the {c} square?"), classes, _i_cell),
            Template("neighbour", "spatial", ("What is {r} the {x}?",), classes, _i_neighbour),
            Template("position_v", "spatial", ("Is the {x} at the top or the bottom?",
                                               "Is the {x} in the top or the bottom row?"), ("top", "bottom"), _i_row),
            Template("position_h", "spatial", ("Is the {x} on the left or the right?",
                                               "Is the {x} in the left or the right column?"), ("left", "right"),
                     _i_column),
        ),
    }


QTYPES = ("attribute", "count", "spatial")


def caption_grid(grid: Grid) -> str:
    parts = [f"{article(grid[cell])} {grid[cell]} at the {_cell_words(cell)}" for cell in CELLS]
    return "A grid with " + join_phrases(parts) + "."


def _choose_classes(rng: np.random.Generator, available: list[str], balanced_animals: bool) -> list[str]:
    """4 distinct classes; with ``balanced_animals`` the number of animals is uniform over what
    the available classes allow."""
    if balanced_animals:
        animals = [k for k in available if k in ANIMALS]
        vehicles = [k for k in available if k not in ANIMALS]
        feasible = [k for k in range(5) if k <= len(animals) and 4 - k <= len(vehicles)]
        k = int(_pick(rng, feasible))
        chosen = ([animals[i] for i in rng.choice(len(animals), size=k, replace=False)] +
                  [vehicles[i] for i in rng.choice(len(vehicles), size=4 - k, replace=False)])
        return [chosen[i] for i in rng.permutation(4)]
    return [available[i] for i in rng.choice(len(available), size=4, replace=False)]


def generate_grids(images: np.ndarray, labels: np.ndarray, cfg: Any,
                   split: str) -> Iterator[tuple[dict[str, Any], Grid, list[int]]]:
    """The rows of a split (``image`` as PNG bytes), each with its grid (cell -> class) and the
    indices of the 4 source images (tiling order of :data:`CELLS`)."""
    size = split_size(cfg, split, NAME)
    qtypes = wanted_qtypes(cfg, NAME, QTYPES)
    opts = check_options(cfg, NAME, DEFAULTS)
    per_image, val_fraction = int(opts["questions_per_image"]), float(opts["val_fraction"])
    if per_image < 1:
        raise FusionBenchError(f"{NAME}: data.options.questions_per_image must be at least 1")
    if not 0.0 < val_fraction < 0.5:
        raise FusionBenchError(f"{NAME}: data.options.val_fraction must be in (0, 0.5) (val and test take "
                               f"it each), not {val_fraction}")
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64)
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2] \
            or images.dtype != np.uint8 or len(labels) != len(images):
        raise FusionBenchError(f"{NAME}: expected uint8 images [N, H, H, 3] and N labels, got "
                               f"{images.dtype} {images.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise FusionBenchError(f"{NAME}: labels must be CIFAR-10 class indices 0..9")
    pool = split_pool(labels, split, val_fraction)
    by_class: dict[str, np.ndarray] = {CLASSES[k]: pool[labels[pool] == k] for k in range(len(CLASSES))}
    available = [k for k in CLASSES if len(by_class[k])]
    if len(available) < 4:
        raise FusionBenchError(f"{NAME}: the {split} pool ({len(pool)} images) has only "
                               f"{len(available)} classes; a grid needs 4 distinct ones")
    image_size = int(cfg.image_size)
    if image_size < 8:
        raise FusionBenchError(f"{NAME}: data.image_size={image_size} is too small")
    tile = images.shape[1]
    rng = split_rng(cfg.seed, split, NAME)
    by_qtype = templates(available)
    plan = answer_plan(rng, qtype_plan(rng, qtypes, size), by_qtype)
    used: dict[tuple[str, str], int] = {}  # (template, answer) -> times asked
    for start in range(0, size, per_image):
        group = plan[start:start + per_image]
        for _attempt in range(MAX_DRAWS):
            classes = _choose_classes(rng, available, balanced_animals=True)
            grid = dict(zip(CELLS, classes))
            asked = ask_group(group, grid, rng, used)
            if asked is not None:
                break
        else:
            raise FusionBenchError(f"{NAME}: no grid in {MAX_DRAWS} draws fits {[(t.name, a) for t, a in group]}; "
                                   f"lower data.options.questions_per_image")
        idx = [int(by_class[k][int(rng.integers(0, len(by_class[k])))]) for k in classes]
        canvas = np.empty((2 * tile, 2 * tile, 3), dtype=np.uint8)
        for i, (r, c) in zip(idx, CELLS.values()):
            canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = images[i]
        img = Image.fromarray(canvas)
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        image = png_bytes(img)
        caption = caption_grid(grid)
        for (template, _), (question, answer, relation) in zip(group, asked):
            yield ({"image": image, "question": question, "answer": answer, "qtype": template.qtype,
                    "relation": relation, "caption": caption, "template": template.name,
                    "choices": list(template.answers)}, grid, idx)


def build_grids(images: np.ndarray, labels: np.ndarray, cfg: Any, split: str) -> datasets.Dataset:
    """The ``cifar_grid`` split built from any (images, labels) source (not cached)."""
    return records_to_dataset([r for r, _, _ in generate_grids(images, labels, cfg, split)], QA_FEATURES)


@register_dataset(NAME)
def build_cifar_grid(cfg: Any, split: str) -> datasets.Dataset:
    """The ``cifar_grid`` split from the real CIFAR-10 test set (cached on disk after the first build)."""
    size = split_size(cfg, split, NAME)
    qtypes = wanted_qtypes(cfg, NAME, QTYPES)
    opts = check_options(cfg, NAME, DEFAULTS)
    key = cache_key(cfg, split, NAME, VERSION, size, qtypes, opts)

    def build() -> datasets.Dataset:
        images, labels = load_cifar10_test()
        return build_grids(images, labels, cfg, split)

    return cached_dataset(NAME, key, build)
