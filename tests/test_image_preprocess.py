"""Image preprocessing: every PIL mode reaches the encoder with its content (16-bit images used to
arrive white), and a non-square image is stretched, padded or cropped as ``vision.resize`` says."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fusionbench.assets.vision import fit_square, load_vision, to_rgb
from fusionbench.config import load_config
from fusionbench.errors import FusionBenchError
from tests.helpers import TINY


@pytest.mark.parametrize("mode, values, expect", [
    ("I;16", [0, 32768, 65535], [0, 128, 255]),  # 16-bit greyscale PNG/TIFF
    ("I", [0, 32768, 65535], [0, 128, 255]),  # 16-bit PNGs PIL opens as 32-bit ints
    ("I", [0, 257, 65535], [0, 1, 255]),  # by mode alone: the same scale for every image of a dataset
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # floats in [0, 1]
    ("L", [0, 128, 255], [0, 128, 255]),
])
def test_every_mode_keeps_its_grey_levels(mode, values, expect):
    arr = np.array([values], dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32, "L": np.uint8}[mode])
    img = Image.fromarray(arr, mode=mode) if mode != "I;16" else Image.fromarray(arr).convert("I;16")
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (1, 3, 3) and (rgb[0, :, 0] == rgb[0, :, 2]).all()
    assert rgb[0, :, 0].tolist() == expect


def test_a_16_bit_png_round_trip_is_not_white(tmp_path):
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8)  # 0 .. 32760: a grey ramp
    path = tmp_path / "ramp16.png"
    Image.fromarray(arr).save(path)
    img = Image.open(path)
    assert np.asarray(img.convert("RGB")).mean() > 250  # PIL's own conversion: (almost) all white
    got = np.asarray(to_rgb(img))[..., 0].astype(float)
    assert got.min() == 0 and 120 <= got.max() <= 130 and np.corrcoef(got.ravel(), arr.ravel())[0, 1] > 0.999


def _two_halves(w, h):
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    return Image.fromarray(a)


@pytest.fixture
def fresh_run(monkeypatch, tmp_path):
    """A run of its own for the once-per-run notes: their markers in tmp_path, none said yet."""
    import tempfile

    from fusionbench.assets import vision

    monkeypatch.setattr(vision, "_warned_stretch", False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("FUSIONBENCH_NOTE_RUN", "test-run")
    return tmp_path / "fusionbench-notes-test-run"


def test_resize_modes_on_a_wide_image(capsys, fresh_run):
    img = _two_halves(40, 20)
    stretch = np.asarray(fit_square(img, 20, "stretch"))
    pad = np.asarray(fit_square(img, 20, "pad"))
    crop = np.asarray(fit_square(img, 20, "crop"))
    assert stretch.shape == pad.shape == crop.shape == (20, 20, 3)
    assert stretch[10, 2].tolist() == [255, 0, 0] and stretch[10, 17].tolist() == [0, 0, 255]
    # pad: the image in the middle band, mean-coloured bands above and below
    assert pad[0, 10].tolist() == [124, 116, 104] and pad[19, 10].tolist() == [124, 116, 104]
    assert pad[10, 2].tolist() == [255, 0, 0]
    # crop: the centre 20x20, half red, half blue, nothing stretched
    assert crop[10, 2].tolist() == [255, 0, 0] and crop[10, 17].tolist() == [0, 0, 255]
    fit_square(img, 20, "stretch")
    assert capsys.readouterr().err.count("a 40x20 image is stretched to 20x20 (vision.resize=stretch") == 1  # once
    assert np.asarray(fit_square(_two_halves(20, 20), 20, "pad")).tolist() == np.asarray(_two_halves(20, 20)).tolist()


class _Wide(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return _two_halves(40, 20)


def _reset_note(worker_id):
    from fusionbench.assets import vision

    vision._warned_stretch = False  # as a spawned worker starts: only the marker keeps the note from repeating


def test_stretch_note_is_said_once_across_data_loader_workers(capfd, fresh_run):
    """The collator (and so the resize) runs in the loader's workers, re-created every epoch, and in
    the main process (validation, evaluation): the note is said once per run, not once per process."""
    fit_square(_two_halves(40, 20), 20, "stretch")  # the main process first
    loader = torch.utils.data.DataLoader(_Wide(), batch_size=2, num_workers=2, worker_init_fn=_reset_note,
                                         collate_fn=lambda imgs: [np.asarray(fit_square(im, 20, "stretch")) for im in imgs])
    for _epoch in range(2):
        assert sum(len(b) for b in loader) == 8
    assert capfd.readouterr().err.count("a 40x20 image is stretched to 20x20") == 1  # 5 without the marker
    assert (fresh_run / "stretch.said").exists()


def test_vision_resize_reaches_preprocess_and_is_validated():
    cfg = load_config(TINY, ["vision.resize=pad"])
    enc = load_vision(cfg.vision)
    wide = _two_halves(2 * enc.image_size, enc.image_size)
    padded = enc.preprocess([wide])
    stretched = load_vision(load_config(TINY).vision).preprocess([wide])
    assert padded.shape == stretched.shape and not torch.equal(padded, stretched)
    with pytest.raises(FusionBenchError, match="vision.resize must be one of stretch, pad, crop, got 'squash'"):
        load_config(TINY, ["vision.resize=squash"])
