"""``scenes``: procedural spatial scenes drawn with PIL, with one or more questions per image.

Each image is a plain light-grey canvas with 1-4 objects (``options.max_objects``), every one a
distinct (colour, shape) pair out of :data:`COLORS` x :data:`SHAPES`, placed in distinct cells of
a coarse 3x3 grid with a small jitter that never leaves the cell. Left/right therefore means "in a
column further left/right" and above/below "in a row further up/down" (CLEVR convention: the
other axis does not matter), and the gap between cells keeps every such relation visible.

Question templates (a few wordings each; answers are one lowercase word or a digit):

``attribute`` (relation ``""``)
    "What color is the {shape}?" -> colour (only when the shape occurs once);
    "What shape is the {color} object?" -> shape (only when the colour occurs once).
``count`` (relation ``""``)
    "How many objects are there?" -> "1".."4";
    "How many {color} objects are there?" / "How many {shape}s are there?" -> "0".."4".
``spatial``
    "What color/shape is the object left of / right of / above / below the {color} {shape}?"
    -> colour/shape, asked only when exactly one object stands in that relation;
    relation ``left_of`` / ``right_of`` / ``above`` / ``below`` (the relation asked).

    "Is the {color} {shape} left or right of the {color} {shape}?" -> "left"/"right" and
    "... above or below ..." -> "above"/"below"; relation is the true relation of the first
    object to the second (``left_of`` / ``right_of`` / ``above`` / ``below``).

    "What color/shape is the leftmost (rightmost, topmost, bottommost) object?" -> colour/shape,
    only when that object is unique; relation ``leftmost`` / ``rightmost`` / ``topmost`` /
    ``bottommost``.

    "Is the {color} {shape} on the left or the right side of the image?" -> "left"/"right"
    (object not in the middle column) and "... in the top or the bottom half ..." -> "top"/"bottom"
    (object not in the middle row); relation ``position``.

Every row names its ``template`` (``color_of_shape``, ``count_shape``, ``compare_h``, ...: see
:func:`templates`) and carries the template's closed answer set as ``choices`` (the candidates
choice scoring ranks). **Balanced**: question types are equally frequent (a shuffled round-robin
over ``cfg.qtypes`` or all three), templates take turns within a type, and the gold answers of each
template take turns over its answer set (:func:`answer_plan`), so within every template the gold
answer is uniform (within one item) and a question-blind guesser scores chance by construction.
A scene is drawn until the planned template has an instance with the planned answer (rejection:
the picture distribution is the natural one given the answer). With ``questions_per_image`` > 1
only an image's first question is planned exactly; the others take the least-used answer their
template offers on that scene (near-balanced). Options:
``questions_per_image`` (default 1: every row has its own image) and ``max_objects`` (1-9,
default 4). The caption lists every object with its place, e.g. "A red circle at the top left
and a blue square on the right."

Train, val and test use different random streams derived from ``cfg.seed`` (the data seed, not the
run's: every strategy and run seed sees the same items); in addition every scene is assigned to one
split by a hash of its full layout, so no two splits share an image.

This module also holds the small helpers the other procedural sources share (split sizes,
question-type plans, the on-disk cache): :func:`split_size`, :func:`wanted_qtypes`,
:func:`qtype_plan`, :func:`split_rng`, :func:`cached_dataset`, :data:`FEATURES`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import numpy as np
from PIL import Image, ImageDraw

from fusionbench.assets.paths import cache_dir
from fusionbench.data import register_dataset
from fusionbench.errors import FusionBenchError

VERSION = "scenes-v2"  # v2: test split, answers balanced per template, template + choices columns
QTYPES = ("attribute", "count", "spatial")
SPLITS = ("train", "val", "test")

#: name -> RGB; chosen to stay apart in hue at 64 px on a light background
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 225),
    "yellow": (235, 190, 0),
    "purple": (145, 60, 195),
}
SHAPES = ("circle", "square", "triangle")
GRID = 3
#: jitter of an object's centre, in cell widths; sizes as a fraction of the cell width.
#: max extent from the cell centre is 0.70/2 + 0.10 = 0.45 < 0.5, so objects never overlap.
JITTERS = (-0.1, -0.05, 0.0, 0.05, 0.1)
SCALES = (0.55, 0.62, 0.7)
BACKGROUNDS = tuple(range(226, 247, 4))  # grey levels
#: a layout goes to val iff its hash % SPLIT_BUCKETS == 0, to test iff it is 1, else to train
SPLIT_BUCKETS = 10

FEATURES = datasets.Features({
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "qtype": datasets.Value("string"),
    "relation": datasets.Value("string"),
    "caption": datasets.Value("string"),
})
#: ``scenes`` rows also name their question template and carry its answer set (the candidates of
#: choice scoring)
QA_FEATURES = datasets.Features({**FEATURES, "template": datasets.Value("string"),
                                 "choices": datasets.Sequence(datasets.Value("string"))})


# --------------------------------------------------------------------------- shared helpers

def plain(value: Any) -> Any:
    """An omegaconf node (or anything else) as plain python containers."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def split_size(cfg: Any, split: str, name: str) -> int:
    if split not in SPLITS:
        raise FusionBenchError(f"dataset {name!r}: unknown split {split!r} (use 'train', 'val' or 'test')")
    size = int({"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split])
    if size <= 0:
        raise FusionBenchError(
            f"dataset {name!r}: data.{split}_size is {size}, so the {split} split would be empty; "
            f"set it to a positive number")
    return size


def wanted_qtypes(cfg: Any, name: str, known: tuple[str, ...] = QTYPES) -> list[str]:
    """``cfg.qtypes`` validated against ``known`` (empty: all of them), in ``known`` order."""
    asked = [str(q) for q in (plain(cfg.qtypes) or [])]
    if not asked:
        return list(known)
    unknown = [q for q in asked if q not in known]
    if unknown:
        raise FusionBenchError(
            f"dataset {name!r}: data.qtypes={asked} keeps question types it does not have "
            f"({', '.join(unknown)}); it has {', '.join(known)}")
    return [q for q in known if q in asked]


def check_options(cfg: Any, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    opts = dict(plain(cfg.options) or {})
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise FusionBenchError(
            f"dataset {name!r}: unknown data.options {unknown}; it takes {sorted(defaults)}")
    return {**defaults, **opts}


def split_rng(seed: int, split: str, name: str) -> np.random.Generator:
    """Independent, reproducible streams per (seed, split, source)."""
    entropy = [int(seed) % (2 ** 63), SPLITS.index(split) + 1, zlib.crc32(name.encode())]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def qtype_plan(rng: np.random.Generator, qtypes: list[str], size: int) -> list[str]:
    """``size`` question types, as equal in number as possible, in random order."""
    plan = [qtypes[i % len(qtypes)] for i in range(size)]
    order = rng.permutation(size)
    return [plan[i] for i in order]


def png_bytes(img: Image.Image) -> bytes:
    """Lossless and deterministic; level 1 is ~3x faster than the default 6 and ~10% larger."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def records_to_dataset(records: list[dict[str, Any]], features: datasets.Features = FEATURES) -> datasets.Dataset:
    columns = {k: [r[k] for r in records] for k in features}
    columns["image"] = [{"bytes": b, "path": None} for b in columns["image"]]
    return datasets.Dataset.from_dict(columns, features=features)


def cached_dataset(name: str, key: dict[str, Any], build: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """``build()`` once, saved under ``cache_dir("data", name, <hash of key>)``; later calls load it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = cache_dir("data", name)
    path = root / digest
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    ds = build()
    if len(ds) == 0:
        raise FusionBenchError(f"dataset {name!r} came out empty for {key}")
    tmp = root / f".{digest}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.save_to_disk(str(tmp))
    (tmp / "fusionbench_key.json").write_text(json.dumps(key, sort_keys=True, default=str, indent=1))
    if path.exists() and not (path / "dataset_info.json").exists():  # a killed, older non-atomic writer's
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)  # refused onto a folder another process finished first: keep its copy
    except OSError:  # (it may be reading it)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "dataset_info.json").exists():
            raise
    return datasets.load_from_disk(str(path))


def cache_key(cfg: Any, split: str, name: str, version: str, size: int, qtypes: list[str],
              options: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "version": version, "split": split, "seed": int(cfg.seed), "size": size,
            "image_size": int(cfg.image_size), "qtypes": sorted(qtypes), "options": options}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    row: int  # 0 = top
    col: int  # 0 = left
    #: centre and side of the bounding box, in pixels of the scene's image
    cx: float
    cy: float
    size: float
    jitter: tuple[int, int] = (0, 0)  # indices into JITTERS (x, y)
    scale: int = 0  # index into SCALES

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: int
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def signature(self) -> str:
        """Everything that determines the picture apart from its resolution."""
        objs = sorted((o.color, o.shape, o.row, o.col, o.jitter, o.scale) for o in self.objects)
        return json.dumps([self.background, objs])

    def split_bucket(self) -> str:
        h = int(hashlib.sha1(self.signature().encode()).hexdigest()[:12], 16) % SPLIT_BUCKETS
        return "val" if h == 0 else "test" if h == 1 else "train"


def make_scene(rng: np.random.Generator, image_size: int, n_objects: Optional[int] = None,
               max_objects: int = 4) -> Scene:
    """A random scene: ``n_objects`` (default uniform in 1..max_objects) distinct (colour, shape)
    pairs in distinct cells of the 3x3 grid. Pure function of ``rng``'s state."""
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else int(n_objects)
    if not 1 <= n <= GRID * GRID:
        raise FusionBenchError(f"scenes hold 1..{GRID * GRID} objects, not {n}")
    combos = [(c, s) for c in COLORS for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    cell = image_size / GRID
    objects = []
    for p, c in zip(picks, cells):
        color, shape = combos[int(p)]
        row, col = divmod(int(c), GRID)
        jx, jy = (int(v) for v in rng.integers(0, len(JITTERS), size=2))
        sc = int(rng.integers(0, len(SCALES)))
        objects.append(SceneObject(
            color=color, shape=shape, row=row, col=col,
            cx=(col + 0.5 + JITTERS[jx]) * cell, cy=(row + 0.5 + JITTERS[jy]) * cell,
            size=SCALES[sc] * cell, jitter=(jx, jy), scale=sc))
    objects.sort(key=lambda o: (o.row, o.col))
    bg = int(BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))])
    return Scene(image_size=image_size, background=bg, objects=tuple(objects))


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image (drawn supersampled, then box-filtered down: smooth edges)."""
    f = 4 if scene.image_size <= 128 else 2
    side = scene.image_size * f
    img = Image.new("RGB", (side, side), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, h = o.cx * f, o.cy * f, o.size * f / 2
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            s = h * 0.9  # a square looks larger than a circle of the same width
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.85), (cx - h, cy + h * 0.85)], fill=fill)
    return img.reduce(f)


_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "center", "right")


def place_phrase(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {_COL_WORDS[col]}"
    if col == 1:
        return f"at the {_ROW_WORDS[row]}"
    return f"at the {_ROW_WORDS[row]} {_COL_WORDS[col]}"


def caption_scene(scene: Scene) -> str:
    parts = [f"{article(o.color)} {o.name} {place_phrase(o.row, o.col)}" for o in scene.objects]
    text = join_phrases(parts)
    if len(parts) == 1:
        text = f"a single {scene.objects[0].name} {place_phrase(scene.objects[0].row, scene.objects[0].col)}"
    return text[0].upper() + text[1:] + "."


# relation -> (phrasings, predicate(candidate, reference))
_RELATIONS: dict[str, tuple[tuple[str, ...], Callable[[SceneObject, SceneObject], bool]]] = {
    "left_of": (("left of", "to the left of"), lambda a, b: a.col < b.col),
    "right_of": (("right of", "to the right of"), lambda a, b: a.col > b.col),
    "above": (("above",), lambda a, b: a.row < b.row),
    "below": (("below", "under"), lambda a, b: a.row > b.row),
}
_EXTREMES = {"leftmost": lambda o: o.col, "rightmost": lambda o: -o.col,
             "topmost": lambda o: o.row, "bottommost": lambda o: -o.row}

Question = tuple[str, str, str]  # question, answer, relation
#: one way a template applies to a scene: (format fields, answer, relation); a field whose value is
#: a tuple is a choice of wordings, drawn when the question is written
Instance = tuple[dict[str, Any], str, str]


def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(0, len(items)))]


def _unique_by(scene: Scene, attr: str) -> list[SceneObject]:
    return [o for o in scene.objects if sum(getattr(p, attr) == getattr(o, attr) for p in scene.objects) == 1]


def _i_color_of_shape(scene: Scene) -> list[Instance]:
    return [({"s": o.shape}, o.color, "") for o in _unique_by(scene, "shape")]


def _i_shape_of_color(scene: Scene) -> list[Instance]:
    return [({"c": o.color}, o.shape, "") for o in _unique_by(scene, "color")]


def _i_count_all(scene: Scene) -> list[Instance]:
    return [({}, str(len(scene.objects)), "")]


def _i_count_color(scene: Scene) -> list[Instance]:
    return [({"c": c}, str(sum(o.color == c for o in scene.objects)), "") for c in COLORS]


def _i_count_shape(scene: Scene) -> list[Instance]:
    return [({"s": s}, str(sum(o.shape == s for o in scene.objects)), "") for s in SHAPES]


def _i_relate(attr: str) -> Callable[[Scene], list[Instance]]:
    def instances(scene: Scene) -> list[Instance]:
        out = []
        for ref in scene.objects:
            for rel, (phrases, pred) in _RELATIONS.items():
                hits = [o for o in scene.objects if o is not ref and pred(o, ref)]
                if len(hits) == 1:
                    out.append(({"p": phrases, "r": ref.name}, getattr(hits[0], attr), rel))
        return out
    return instances


def _i_compare_h(scene: Scene) -> list[Instance]:
    return [({"a": a.name, "b": b.name}, *(("left", "left_of") if a.col < b.col else ("right", "right_of")))
            for a in scene.objects for b in scene.objects if a is not b and a.col != b.col]


def _i_compare_v(scene: Scene) -> list[Instance]:
    return [({"a": a.name, "b": b.name}, *(("above",) * 2 if a.row < b.row else ("below",) * 2))
            for a in scene.objects for b in scene.objects if a is not b and a.row != b.row]


def _i_extreme(attr: str) -> Callable[[Scene], list[Instance]]:
    def instances(scene: Scene) -> list[Instance]:
        if len(scene.objects) < 2:
            return []
        out = []
        for rel, key in _EXTREMES.items():
            best = min(key(o) for o in scene.objects)
            hits = [o for o in scene.objects if key(o) == best]
            if len(hits) == 1:
                out.append(({"r": rel}, getattr(hits[0], attr), rel))
        return out
    return instances


def _i_position_h(scene: Scene) -> list[Instance]:
    return [({"a": o.name}, "left" if o.col == 0 else "right", "position") for o in scene.objects if o.col != 1]


def _i_position_v(scene: Scene) -> list[Instance]:
    return [({"a": o.name}, "top" if o.row == 0 else "bottom", "position") for o in scene.objects if o.row != 1]


@dataclass(frozen=True)
class Template:
    """A question template: its wordings, the closed set of answers it can have (the candidates
    choice scoring ranks, and the set its gold answers are balanced over) and every way it applies
    to a scene."""
    name: str
    qtype: str
    wordings: tuple[str, ...]
    answers: tuple[str, ...]
    instances: Callable[[Scene], list[Instance]]

    def write(self, fields: dict[str, Any], rng: np.random.Generator) -> str:
        chosen = {k: (_pick(rng, v) if isinstance(v, tuple) else v) for k, v in fields.items()}
        return _pick(rng, self.wordings).format(**chosen)


def templates(max_objects: int = 4) -> dict[str, tuple[Template, ...]]:
    """The templates per question type, with answer sets for scenes of up to ``max_objects``."""
    colors, shapes = tuple(COLORS), SHAPES
    counts = lambda lo, hi: tuple(str(i) for i in range(lo, hi + 1))  # noqa: E731
    return {
        "attribute": (
            Template("color_of_shape", "attribute", ("What color is the {s}?", "What is the color of the {s}?",
                                                     "Which color does the {s} have?"), colors, _i_color_of_shape),
            Template("shape_of_color", "attribute", ("What shape is the {c} object?",
                                                     "What is the shape of the {c} object?", "Which shape is {c}?"),
                     shapes, _i_shape_of_color),
        ),
        "count": (
            Template("count_all", "count", ("How many objects are there?", "How many shapes are in the image?",
                                            "How many objects can you see?"), counts(1, max_objects), _i_count_all),
            Template("count_color", "count", ("How many {c} objects are there?", "How many {c} shapes are in the image?"),
                     counts(0, min(max_objects, len(shapes))), _i_count_color),
            Template("count_shape", "count", ("How many {s}s are there?", "How many {s}s are in the image?"),
                     counts(0, min(max_objects, len(colors))), _i_count_shape),
        ),
        "spatial": (
            Template("relate_color", "spatial", ("What color is the object {p} the {r}?",
                                                 "Which color is the object {p} the {r}?"), colors, _i_relate("color")),
            Template("relate_shape", "spatial", ("What shape is the object {p} the {r}?",
                                                 "Which shape is the object {p} the {r}?"), shapes, _i_relate("shape")),
            Template("compare_h", "spatial", ("Is the {a} left or right of the {b}?",
                                              "Is the {a} to the left or to the right of the {b}?"),
                     ("left", "right"), _i_compare_h),
            Template("compare_v", "spatial", ("Is the {a} above or below the {b}?",
                                              "Is the {a} located above or below the {b}?"),
                     ("above", "below"), _i_compare_v),
            Template("extreme_color", "spatial", ("What color is the {r} object?",
                                                  "Which color does the {r} object have?"), colors, _i_extreme("color")),
            Template("extreme_shape", "spatial", ("What shape is the {r} object?",
                                                  "Which shape does the {r} object have?"), shapes, _i_extreme("shape")),
            Template("position_h", "spatial", ("Is the {a} on the left or the right side of the image?",
                                               "Is the {a} on the left or on the right?"), ("left", "right"), _i_position_h),
            Template("position_v", "spatial", ("Is the {a} in the top or the bottom half of the image?",
                                               "Is the {a} at the top or at the bottom?"), ("top", "bottom"), _i_position_v),
        ),
    }


def answer_plan(rng: np.random.Generator, qtypes_planned: list[str],
                by_qtype: dict[str, tuple[Template, ...]]) -> list[tuple[Template, str]]:
    """A (template, gold answer) per planned item: within a question type the templates take turns
    and within a template the answers take turns (from a random start), so every template's gold
    answers are uniform over its answer set within one item; the order stays the plan's."""
    turn: dict[str, int] = {}
    answer_turn: dict[str, int] = {}
    offsets = {t.name: int(rng.integers(0, len(t.answers))) for ts in by_qtype.values() for t in ts}
    starts = {q: int(rng.integers(0, len(ts))) for q, ts in by_qtype.items()}
    out = []
    for qtype in qtypes_planned:
        ts = by_qtype[qtype]
        t = ts[(starts[qtype] + turn.get(qtype, 0)) % len(ts)]
        turn[qtype] = turn.get(qtype, 0) + 1
        k = answer_turn.get(t.name, 0)
        answer_turn[t.name] = k + 1
        out.append((t, t.answers[(offsets[t.name] + k) % len(t.answers)]))
    return out


def ask(template: Template, answer: str, scene: Scene, rng: np.random.Generator,
        avoid: frozenset[str] = frozenset()) -> Optional[Question]:
    """A question of ``template`` about ``scene`` whose gold answer is ``answer`` (drawn uniformly
    among the ways the template applies with that answer), or None if there is none."""
    fits = [(f, rel) for f, a, rel in template.instances(scene) if a == answer]
    for _ in range(4):
        if not fits:
            return None
        fields, rel = _pick(rng, fits)
        q = template.write(fields, rng)
        if q not in avoid:
            return q, answer, rel
    return None


def ask_group(group: list[tuple[Template, str]], subject: Any, rng: np.random.Generator,
              used: dict[tuple[str, str], int]) -> Optional[list[Question]]:
    """The questions of one image: the first gets its planned answer; further ones
    (questions_per_image > 1) the least-used answer (``used``: (template, answer) -> times asked)
    the subject offers, which keeps them near-balanced where an exact plan would ask for impossible
    combinations. None when the subject does not fit (draw another); on success ``used`` counts them."""
    asked: list[Question] = []
    for k, (template, answer) in enumerate(group):
        if k:
            offered = sorted({a for _, a, _ in template.instances(subject)},
                             key=lambda a: (used.get((template.name, a), 0), template.answers.index(a)))
            answer = offered[0] if offered else answer
        q = ask(template, answer, subject, rng, frozenset(a[0] for a in asked))
        if q is None:
            return None
        asked.append(q)
    for (template, _), (_, answer, _) in zip(group, asked):
        used[(template.name, answer)] = used.get((template.name, answer), 0) + 1
    return asked


#: scene draws per item before giving up (the rarest answers, e.g. four triangles, take ~10^3)
MAX_DRAWS = 20000


def generate_examples(cfg: Any, split: str) -> Iterator[tuple[dict[str, Any], Scene]]:
    """The rows of the ``scenes`` split (``image`` as PNG bytes) with the scene each was drawn
    from. Deterministic in (cfg.seed, split, sizes, qtypes, options, image_size). Every row names
    its ``template`` and carries the template's answer set as ``choices``; gold answers are
    balanced within each template (:func:`answer_plan`), scenes are drawn until one fits."""
    size = split_size(cfg, split, "scenes")
    qtypes = wanted_qtypes(cfg, "scenes")
    opts = check_options(cfg, "scenes", {"questions_per_image": 1, "max_objects": 4})
    per_image, max_objects = int(opts["questions_per_image"]), int(opts["max_objects"])
    if per_image < 1:
        raise FusionBenchError("scenes: data.options.questions_per_image must be at least 1")
    if not 1 <= max_objects <= GRID * GRID:
        raise FusionBenchError(f"scenes: data.options.max_objects must be in 1..{GRID * GRID}")
    image_size = int(cfg.image_size)
    if image_size < 16:
        raise FusionBenchError(f"scenes: data.image_size={image_size} is too small (at least 16)")
    by_qtype = templates(max_objects)
    rng = split_rng(cfg.seed, split, "scenes")
    plan = answer_plan(rng, qtype_plan(rng, qtypes, size), by_qtype)
    used: dict[tuple[str, str], int] = {}  # (template, answer) -> times asked
    for start in range(0, size, per_image):
        group = plan[start:start + per_image]
        for _attempt in range(MAX_DRAWS):
            scene = make_scene(rng, image_size, max_objects=max_objects)
            if scene.split_bucket() != split:
                continue
            asked = ask_group(group, scene, rng, used)
            if asked is not None:
                break
        else:
            raise FusionBenchError(
                f"scenes: no scene in {MAX_DRAWS} draws fits {[(t.name, a) for t, a in group]} "
                f"(max_objects={max_objects}); lower data.options.questions_per_image")
        image = png_bytes(render_scene(scene))
        caption = caption_scene(scene)
        for (template, _), (question, answer, relation) in zip(group, asked):
            yield ({"image": image, "question": question, "answer": answer, "qtype": template.qtype,
                    "relation": relation, "caption": caption, "template": template.name,
                    "choices": list(template.answers)}, scene)


@register_dataset("scenes")
def build_scenes(cfg: Any, split: str) -> datasets.Dataset:
    """The ``scenes`` split as a ``datasets.Dataset`` (cached on disk after the first build)."""
    size = split_size(cfg, split, "scenes")
    qtypes = wanted_qtypes(cfg, "scenes")
    opts = check_options(cfg, "scenes", {"questions_per_image": 1, "max_objects": 4})
    key = cache_key(cfg, split, "scenes", VERSION, size, qtypes, opts)
    return cached_dataset("scenes", key,
                          lambda: records_to_dataset([r for r, _ in generate_examples(cfg, split)], QA_FEATURES))
