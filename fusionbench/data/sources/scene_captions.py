"""``scenes_captions``: the ``scenes`` pictures as a captioning task (an optional training task).

Every row is one freshly drawn scene (the generator, renderer, captioner and split rule of
:mod:`fusionbench.data.sources.scenes`, not a copy of them): ``question`` is the captioning
instruction :data:`CAPTION_INSTRUCTION`, ``answer`` and ``caption`` are the scene's caption
(e.g. "A red circle at the top left and a blue square on the right."), ``qtype`` is ``"caption"``
and ``relation`` is empty. The columns and features are those of ``scenes`` (:data:`FEATURES`).

Options: ``max_objects`` (1-9, default 4), as in ``scenes``. ``data.qtypes`` may be empty or
``[caption]``. Train and val use different random streams derived from ``cfg.seed`` and, as in
``scenes``, a scene goes to the split its layout hash names, so the two splits never share an image.
The rows are deterministic in (seed, split, size, max_objects, image_size) and cached on disk.

Captions are 10-25 words, so with a byte-level tokenizer (the tiny tier) a row is a few hundred
tokens: give ``trainer.max_length`` room (``check_lengths`` says so before any compute).
"""
from __future__ import annotations

from typing import Any, Iterator

import datasets

from fusionbench.data import register_dataset
from fusionbench.data.sources.scenes import (
    GRID, Scene, cache_key, cached_dataset, caption_scene, check_options, make_scene, png_bytes,
    records_to_dataset, render_scene, split_rng, split_size, wanted_qtypes,
)
from fusionbench.errors import FusionBenchError

NAME = "scenes_captions"
VERSION = "scenes-captions-v1"
QTYPES = ("caption",)
#: the instruction every row asks (and that caption evaluation prompts with)
CAPTION_INSTRUCTION = "Describe the image."
DEFAULTS = {"max_objects": 4}


def _options(cfg: Any) -> dict[str, Any]:
    opts = check_options(cfg, NAME, DEFAULTS)
    if not 1 <= int(opts["max_objects"]) <= GRID * GRID:
        raise FusionBenchError(f"{NAME}: data.options.max_objects must be in 1..{GRID * GRID}")
    return opts


def generate_caption_examples(cfg: Any, split: str) -> Iterator[tuple[dict[str, Any], Scene]]:
    """The rows of a ``scenes_captions`` split (``image`` as PNG bytes) with their scenes."""
    size = split_size(cfg, split, NAME)
    wanted_qtypes(cfg, NAME, QTYPES)
    max_objects = int(_options(cfg)["max_objects"])
    image_size = int(cfg.image_size)
    if image_size < 16:
        raise FusionBenchError(f"{NAME}: data.image_size={image_size} is too small (at least 16)")
    rng = split_rng(cfg.seed, split, NAME)
    made = 0
    while made < size:
        scene = make_scene(rng, image_size, max_objects=max_objects)
        if scene.split_bucket() != split:
            continue
        caption = caption_scene(scene)
        made += 1
        yield ({"image": png_bytes(render_scene(scene)), "question": CAPTION_INSTRUCTION, "answer": caption,
                "qtype": "caption", "relation": "", "caption": caption}, scene)


@register_dataset(NAME)
def build_scene_captions(cfg: Any, split: str) -> datasets.Dataset:
    """The ``scenes_captions`` split as a ``datasets.Dataset`` (cached on disk after the first build)."""
    size = split_size(cfg, split, NAME)
    qtypes = wanted_qtypes(cfg, NAME, QTYPES)
    key = cache_key(cfg, split, NAME, VERSION, size, qtypes, _options(cfg))
    return cached_dataset(NAME, key,
                          lambda: records_to_dataset([r for r, _ in generate_caption_examples(cfg, split)]))
