"""Captioning: the ``scenes_captions`` training source and the caption metrics (pycocoevalcap)."""
import json

import datasets
import pytest
import torch

from fusionbench.config import DataConfig
from fusionbench.data import DATASETS
from fusionbench.data.format import check_lengths, encode
from fusionbench.data.sources import scene_captions as scc
from fusionbench.data.sources import scenes as sc
from fusionbench.errors import FusionBenchError
from fusionbench.evaluation.captions import (
    caption_prompt_ids, evaluate_captions, normalise_caption, score_captions,
)
from fusionbench.model import IGNORE_INDEX, IMAGE_TOKEN_ID
from tests.helpers import tiny_model

COLUMNS = ["image", "question", "answer", "qtype", "relation", "caption"]
SCORES = ("bleu1", "bleu4", "cider", "rouge_l", "exact")


def build(split="train", **kw):
    cfg = DataConfig(**{"name": "scenes_captions", "train_size": 24, "val_size": 8, "image_size": 32, **kw})
    return DATASETS.get("scenes_captions")(cfg, split)


def raw_images(ds):
    return [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("mlp")


# ----------------------------------------------------------------------------- the data source

def test_caption_source_schema():
    assert "scenes_captions" in DATASETS
    ds = build()
    assert len(ds) == 24 and ds.column_names == COLUMNS and ds.features == sc.FEATURES
    img = ds[0]["image"]
    assert img.mode == "RGB" and img.size == (32, 32)
    for row in ds.remove_columns("image"):
        assert row["qtype"] == "caption" and row["relation"] == ""
        assert row["question"] == scc.CAPTION_INSTRUCTION
        assert row["answer"] == row["caption"]
        assert row["caption"][0].isupper() and row["caption"].endswith(".")
        assert 3 <= len(row["caption"].split()) <= 30
    assert len(set(ds["caption"])) > 12  # varied captions, not one template


def test_caption_source_deterministic_and_split(tmp_path, monkeypatch):
    first = build()
    monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path / "other-cache"))  # built again, not loaded
    again = build()
    assert first["caption"] == again["caption"] and raw_images(first) == raw_images(again)
    # the rows are the scenes generator's own scenes, with its caption
    rows = list(scc.generate_caption_examples(DataConfig(train_size=24, image_size=32), "train"))
    assert [r["caption"] for r, _ in rows] == first["caption"]
    assert all(r["caption"] == sc.caption_scene(s) and s.split_bucket() == "train" for r, s in rows)
    assert build(seed=1)["caption"] != first["caption"]
    val = build("val")
    assert len(val) == 8 and not set(raw_images(val)) & set(raw_images(first))
    one = build(options={"max_objects": 1})
    assert all(c.startswith("A single ") for c in one["caption"])


def test_caption_source_rejects_bad_config():
    with pytest.raises(FusionBenchError, match="question types"):
        build(qtypes=["spatial"])
    with pytest.raises(FusionBenchError, match="unknown data.options"):
        build(options={"questions_per_image": 2})
    with pytest.raises(FusionBenchError, match="max_objects"):
        build(options={"max_objects": 10})
    assert len(build(qtypes=["caption"])) == 24


def test_multi_word_answers_format(model):
    """format.encode labels the whole caption (+ EOS); check_lengths sees its full length."""
    ds = build()
    tok = model.tokenizer
    ids, labels = encode(tok, ds[0]["question"], ds[0]["answer"], model.num_image_tokens)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]).strip() == ds[0]["answer"]
    longest = check_lengths(tok, ds, model.num_image_tokens, 512, "scenes_captions/train")
    assert longest > len(ds[0]["answer"])  # byte-level tokenizer: one token per character
    with pytest.raises(FusionBenchError, match="trainer.max_length"):
        check_lengths(tok, ds, model.num_image_tokens, 64, "scenes_captions/train")


# ------------------------------------------------------------------------------------ scoring

def test_scores_perfect_wrong_and_normalised():
    refs = build()["caption"][:10]
    perfect = score_captions(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["bleu1"] == pytest.approx(1.0)
    assert perfect["cider"] > 5 and perfect["rouge_l"] == pytest.approx(1.0) and perfect["exact"] == 1.0
    # case and punctuation do not matter (the PTBTokenizer's job, done in Python)
    shouted = [r.upper().replace(",", " ,").rstrip(".") + " !" for r in refs]
    assert score_captions(shouted, refs) == pytest.approx(perfect)
    assert normalise_caption("A red circle, on the LEFT.") == "a red circle on the left"
    # another scene's caption shares the vocabulary but scores far lower
    wrong = score_captions(refs[1:] + refs[:1], refs)
    assert wrong["bleu4"] < 0.6 and wrong["cider"] < perfect["cider"] / 3 and wrong["exact"] == 0.0
    garbage = score_captions(["", "zzz"] * 5, refs)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in garbage.values())
    # several references per item
    assert score_captions([refs[0]], [[refs[1], refs[0]]])["exact"] == 1.0
    with pytest.raises(FusionBenchError):
        score_captions(refs[:2], refs[:3])


# --------------------------------------------------------------------------------- evaluation

def test_caption_prompt(model):
    tok, n = model.tokenizer, model.num_image_tokens
    with_image = caption_prompt_ids(tok, n, True)
    text_only = caption_prompt_ids(tok, n, False)
    assert with_image.count(IMAGE_TOKEN_ID) == n and IMAGE_TOKEN_ID not in text_only
    text = tok.decode([t for t in with_image if t != IMAGE_TOKEN_ID])
    assert scc.CAPTION_INSTRUCTION in text and "single word" not in text
    assert text.rstrip().endswith("assistant")  # the chat template's generation prompt


def test_evaluate_captions_tiny(model):
    ds = build("val")
    was = model.training
    metrics, records = evaluate_captions(model, ds, model.vision.preprocess, n_items=5, batch_size=4,
                                         max_new_tokens=6, return_records=True)
    assert model.training == was
    assert metrics["cap/n_items"] == 5 and len(records) == 5
    for k in SCORES:
        for key in (f"cap/{k}", f"cap/{k}_text_only"):
            assert 0.0 <= metrics[key] <= (10.0 if k == "cider" else 1.0), key
    assert [r["caption"] for r in records] == ds["caption"][:5]
    # a QA dataset with captions: rows that repeat an image are one item
    qa = sc.build_scenes(DataConfig(train_size=8, val_size=6, image_size=32,
                                    options={"questions_per_image": 3}), "val")
    only = evaluate_captions(model, qa, model.vision.preprocess, n_items=10, batch_size=8, max_new_tokens=2,
                             text_only_baseline=False)
    assert only["cap/n_items"] == 2 and "cap/cider_text_only" not in only
    with pytest.raises(FusionBenchError, match="caption"):
        evaluate_captions(model, ds.remove_columns("caption"), model.vision.preprocess, 2, 2, 2)


def test_training_path(tmp_path):
    from fusionbench.cli import main

    rc = main(["run", "tests/tiny.yaml", "data.name=scenes_captions", "trainer.max_length=512",
               f"output_dir={tmp_path}", f"results_file={tmp_path}/r.jsonl"])
    assert rc == 0
    row = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert row["data"] == "scenes_captions" and torch.isfinite(torch.tensor(row["train_loss_final"]))
    assert "mm/caption/acc" not in row  # captions are not scored by first-word exact match


def test_caption_rows_train_under_the_caption_prompt_and_run_scores_captions(tmp_path):
    from fusionbench.cli import main
    from fusionbench.data.format import CAPTION_SYSTEM_PROMPT, SYSTEM_PROMPT, Collator
    from fusionbench.results import read_results
    from tests.helpers import TINY, tiny_model

    model = tiny_model("mlp")
    tok = model.tokenizer
    collate = Collator(tok, model.vision.preprocess, model.num_image_tokens, 1024)
    img = model.vision.preprocess  # noqa: F841 (the collator preprocesses)
    from PIL import Image
    rows = [{"image": Image.new("RGB", (32, 32)), "question": "Describe the image.", "answer": "A red circle.",
             "qtype": "caption"},
            {"image": Image.new("RGB", (32, 32)), "question": "What color?", "answer": "red", "qtype": "attribute"}]
    texts = tok.batch_decode([[t for t in ids if t >= 0] for ids in collate(rows)["input_ids"].tolist()])
    assert CAPTION_SYSTEM_PROMPT in texts[0] and SYSTEM_PROMPT in texts[1]
    out = tmp_path / "r.jsonl"
    assert main(["run", str(TINY), "data.name=scenes_captions", "trainer.max_length=512", "eval.captions=true",
                 "eval.caption_items=4", "eval.caption_max_new_tokens=8",
                 f"output_dir={tmp_path}", f"results_file={out}"]) == 0
    [row] = read_results(out).to_dict("records")
    assert 0 <= row["cap/cider"] and 0 <= row["cap/bleu4"] <= 1 and "cap/cider_text_only" in row
    assert "mm/acc" not in row  # no short-answer rows: no exact-match block, no fake caption accuracy
    assert main(["run", str(TINY), "eval.captions=true", f"output_dir={tmp_path}", f"results_file={out}"]) == 0
