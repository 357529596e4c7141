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

Question types are balanced exactly (a shuffled round-robin over ``cfg.qtypes`` or all three),
templates are equally frequent within a type (a scene a drawn template does not apply to is
redrawn). Options:
``questions_per_image`` (default 1: every row has its own image) and ``max_objects`` (1-9,
default 4). The caption lists every object with its place, e.g. "A red circle at the top left
and a blue square on the right."

Train and val use different random streams derived from ``cfg.seed``; in addition every scene
is assigned to one split by a hash of its full layout, so the two splits never share an image.

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

VERSION = "scenes-v1"
QTYPES = ("attribute", "count", "spatial")
SPLITS = ("train", "val")

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
VAL_BUCKET = 10  # a layout goes to val iff its hash % VAL_BUCKET == 0

FEATURES = datasets.Features({
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "qtype": datasets.Value("string"),
    "relation": datasets.Value("string"),
    "caption": datasets.Value("string"),
})


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
        raise FusionBenchError(f"dataset {name!r}: unknown split {split!r} (use 'train' or 'val')")
    size = int(cfg.train_size if split == "train" else cfg.val_size)
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


def records_to_dataset(records: list[dict[str, Any]]) -> datasets.Dataset:
    columns = {k: [r[k] for r in records] for k in FEATURES}
    columns["image"] = [{"bytes": b, "path": None} for b in columns["image"]]
    return datasets.Dataset.from_dict(columns, features=FEATURES)


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
    try:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:  # another process finished first
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
        h = int(hashlib.sha1(self.signature().encode()).hexdigest()[:12], 16)
        return "val" if h % VAL_BUCKET == 0 else "train"


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


def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(0, len(items)))]


def _ask_attr(rng: np.random.Generator, o: SceneObject) -> tuple[str, str]:
    """("color"|"shape", answer) for reporting an attribute of ``o``."""
    return ("color", o.color) if rng.random() < 0.5 else ("shape", o.shape)


def _q_color_of_shape(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    t = _pick(rng, ("What color is the {s}?", "What is the color of the {s}?",
                    "Which color does the {s} have?"))
    return t.format(s=o.shape), o.color, ""


def _q_shape_of_color(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    unique = [o for o in scene.objects if sum(p.color == o.color for p in scene.objects) == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    t = _pick(rng, ("What shape is the {c} object?", "What is the shape of the {c} object?",
                    "Which shape is {c}?"))
    return t.format(c=o.color), o.shape, ""


def _q_count_all(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    t = _pick(rng, ("How many objects are there?", "How many shapes are in the image?",
                    "How many objects can you see?"))
    return t, str(len(scene.objects)), ""


def _q_count_color(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    present = sorted({o.color for o in scene.objects})
    c = _pick(rng, present) if rng.random() < 0.75 else _pick(rng, COLORS)
    t = _pick(rng, ("How many {c} objects are there?", "How many {c} shapes are in the image?"))
    return t.format(c=c), str(sum(o.color == c for o in scene.objects)), ""


def _q_count_shape(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    present = sorted({o.shape for o in scene.objects})
    s = _pick(rng, present) if rng.random() < 0.75 else _pick(rng, SHAPES)
    t = _pick(rng, ("How many {s}s are there?", "How many {s}s are in the image?"))
    return t.format(s=s), str(sum(o.shape == s for o in scene.objects)), ""


def _q_relate(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    options = []
    for ref in scene.objects:
        for rel, (_, pred) in _RELATIONS.items():
            hits = [o for o in scene.objects if o is not ref and pred(o, ref)]
            if len(hits) == 1:
                options.append((ref, rel, hits[0]))
    if not options:
        return None
    ref, rel, target = _pick(rng, options)
    phrase = _pick(rng, _RELATIONS[rel][0])
    attr, answer = _ask_attr(rng, target)
    t = _pick(rng, ("What {a} is the object {p} the {r}?", "Which {a} is the object {p} the {r}?"))
    return t.format(a=attr, p=phrase, r=ref.name), answer, rel


def _q_compare(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    pairs = [(a, b, axis) for a in scene.objects for b in scene.objects if a is not b
             for axis in ("h", "v") if (a.col != b.col if axis == "h" else a.row != b.row)]
    if not pairs:
        return None
    a, b, axis = _pick(rng, pairs)
    if axis == "h":
        t = _pick(rng, ("Is the {a} left or right of the {b}?",
                        "Is the {a} to the left or to the right of the {b}?"))
        answer, rel = ("left", "left_of") if a.col < b.col else ("right", "right_of")
    else:
        t = _pick(rng, ("Is the {a} above or below the {b}?",
                        "Is the {a} located above or below the {b}?"))
        answer = rel = "above" if a.row < b.row else "below"
    return t.format(a=a.name, b=b.name), answer, rel


def _q_extreme(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    if len(scene.objects) < 2:
        return None
    options = []
    for rel, key in _EXTREMES.items():
        best = min(key(o) for o in scene.objects)
        hits = [o for o in scene.objects if key(o) == best]
        if len(hits) == 1:
            options.append((rel, hits[0]))
    if not options:
        return None
    rel, o = _pick(rng, options)
    attr, answer = _ask_attr(rng, o)
    t = _pick(rng, ("What {a} is the {r} object?", "Which {a} does the {r} object have?"))
    return t.format(a=attr, r=rel), answer, rel


def _q_position(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    options = [(o, "h") for o in scene.objects if o.col != 1] + \
              [(o, "v") for o in scene.objects if o.row != 1]
    if not options:
        return None
    o, axis = _pick(rng, options)
    if axis == "h":
        t = _pick(rng, ("Is the {a} on the left or the right side of the image?",
                        "Is the {a} on the left or on the right?"))
        answer = "left" if o.col == 0 else "right"
    else:
        t = _pick(rng, ("Is the {a} in the top or the bottom half of the image?",
                        "Is the {a} at the top or at the bottom?"))
        answer = "top" if o.row == 0 else "bottom"
    return t.format(a=o.name), answer, "position"


TEMPLATES: dict[str, tuple[Callable[[Scene, np.random.Generator], Optional[Question]], ...]] = {
    "attribute": (_q_color_of_shape, _q_shape_of_color),
    "count": (_q_count_all, _q_count_color, _q_count_shape),
    "spatial": (_q_relate, _q_compare, _q_extreme, _q_position),
}


def ask_question(scene: Scene, qtype: str, rng: np.random.Generator,
                 avoid: frozenset[str] = frozenset()) -> Optional[Question]:
    """A (question, answer, relation) of ``qtype`` about ``scene``, or None when the template
    drawn (uniformly among the qtype's templates) does not apply to this scene; the caller then
    draws a new scene, which keeps the templates equally frequent. Questions in ``avoid`` (already
    asked about this image) are skipped."""
    template = _pick(rng, TEMPLATES[qtype])
    for _ in range(4):
        q = template(scene, rng)
        if q is None:
            return None
        if q[0] not in avoid:
            return q
    return None


def generate_examples(cfg: Any, split: str) -> Iterator[tuple[dict[str, Any], Scene]]:
    """The rows of the ``scenes`` split (``image`` as PNG bytes) with the scene each was drawn
    from. Deterministic in (cfg.seed, split, sizes, qtypes, options, image_size)."""
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
    rng = split_rng(cfg.seed, split, "scenes")
    plan = qtype_plan(rng, qtypes, size)
    for start in range(0, size, per_image):
        group = plan[start:start + per_image]
        for _attempt in range(1000):
            scene = make_scene(rng, image_size, max_objects=max_objects)
            if scene.split_bucket() != split:
                continue
            asked: list[Question] = []
            for qtype in group:
                q = ask_question(scene, qtype, rng, frozenset(a[0] for a in asked))
                if q is None:
                    break
                asked.append(q)
            if len(asked) == len(group):
                break
        else:  # pragma: no cover - only with absurd options
            raise FusionBenchError(f"scenes: cannot find a scene for question types {group}")
        image = png_bytes(render_scene(scene))
        caption = caption_scene(scene)
        for qtype, (question, answer, relation) in zip(group, asked):
            yield ({"image": image, "question": question, "answer": answer, "qtype": qtype,
                    "relation": relation, "caption": caption}, scene)


@register_dataset("scenes")
def build_scenes(cfg: Any, split: str) -> datasets.Dataset:
    """The ``scenes`` split as a ``datasets.Dataset`` (cached on disk after the first build)."""
    size = split_size(cfg, split, "scenes")
    qtypes = wanted_qtypes(cfg, "scenes")
    opts = check_options(cfg, "scenes", {"questions_per_image": 1, "max_objects": 4})
    key = cache_key(cfg, split, "scenes", VERSION, size, qtypes, opts)
    return cached_dataset("scenes", key,
                          lambda: records_to_dataset([r for r, _ in generate_examples(cfg, split)]))
