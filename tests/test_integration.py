"""The real embedded default: SmolLM2-135M-Instruct (GGUF from PyPI, re-saved as HF) +
EfficientNet-Lite0 (ImageNet, PyPI), the real text suite, a couple of training steps and a few
eval items. Uses the default asset cache (prepared once; later runs take seconds to load)."""
import json

import pytest

from fusionbench.config import load_config
from fusionbench.runner import run
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_real_default_backbones_train_and_evaluate(tmp_path):
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml", [
        "grid={}", "fusion=linear", "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=2", "trainer.checkpoint=false",
        "data.train_size=8", "data.val_size=6", "data.test_size=9", "eval.mm_items=4", "eval.batch_size=4",
        "eval.val_items=4",
        "eval.text.n_per_task=3", "eval.text.ppl_chunks=2", "eval.text.ppl_chunk_tokens=32",
        "eval.curve_every_n_steps=1", "eval.curve_items_per_task=2", "eval.curve_prose_chunks=1",
        f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}"])
    [row] = run(cfg)
    assert row["lm"] == "smollm2" and row["vision"] == "efficientnet_lite0"
    assert row["params_total"] > 130_000_000  # SmolLM2-135M + EfficientNet-Lite0
    assert row["params_trainable"] == 1280 * 576 + 576
    assert row["mm/n_items"] == 4 and 0 <= row["mm/acc"] <= 1
    # choice scoring of the 9 test items, with the image controls beside it
    assert row["mm/choice/n"] == 9 and 0 <= row["mm/choice/acc"] <= 1 and 0 < row["mm/choice/chance"] < 1
    assert row["mm/choice/image_gain"] == row["mm/choice/acc"] - row["mm/choice/acc_shuffled"]
    assert "mm/choice/acc_no_image" in row and len(row["mm/choice/items"]) == 9
    # the real LM is far better than a random one at natural prose
    assert 2.0 < row["base/text/austen/log_ppl"] < 6.0
    # frozen LM: the text path is untouched, so forgetting is exactly zero
    assert row["forgetting/mc_acc_drop"] == 0.0 and row["forgetting/austen/delta_log_ppl"] == 0.0
    assert row["text/kl"] == 0.0  # token KL to the base LM: exactly zero, not merely small
    curve = json.loads(row["curve"])  # forgetting curve: evaluated at steps 0, 1, 2
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert all(p["forgetting/mc_acc_drop"] == 0.0 and p["text/kl"] == 0.0 for p in curve)


def test_run_with_the_lm_eval_backend_records_standard_scores_and_zero_forgetting(tmp_path):
    """The text suite through lm-evaluation-harness (local BIG-bench + Austen task configs), on the
    tiny tier's LM: base and trained text-only path give identical lm-eval results."""
    cfg = load_config(ROOT / "tests" / "tiny.yaml", [
        "fusion=linear", "eval.text_suite=true", "eval.text.backend=lm_eval", "eval.text.n_per_task=3",
        "eval.text.ppl_chunks=1", f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'res.jsonl'}"])
    [row] = run(cfg)
    for key in ("text/general_knowledge/acc", "text/general_knowledge/acc_stderr", "text/austen/bits_per_byte"):
        assert key in row and row[key] == row[key], key
    assert row["text/general_knowledge/n"] == 3
    assert row["forgetting/mc_acc_drop"] == 0.0 and row["forgetting/austen/delta_bits_per_byte"] == 0.0


def test_lm_source_may_be_a_gguf_file_and_bad_paths_say_what_they_are_not(tmp_path, monkeypatch):
    """``lm.source: path/to/x.gguf`` converts once into the cache, like the embedded default (the
    same SmolLM2 GGUF gives the same logits); a missing .gguf or local path is one clear error."""
    import torch

    from fusionbench.assets.lm import SMOLLM2_GGUF, SMOLLM2_REQ, load_lm
    from fusionbench.assets.pypi import pypi_file
    from fusionbench.config import LMConfig
    from fusionbench.errors import FusionBenchError
    from omegaconf import OmegaConf

    lm_cfg = lambda src: OmegaConf.merge(OmegaConf.structured(LMConfig), {"source": src})  # noqa: E731
    gguf = pypi_file(SMOLLM2_REQ, f"*/{SMOLLM2_GGUF}")
    local = tmp_path / "my model.gguf"
    local.symlink_to(gguf)
    ref, ref_tok = load_lm(lm_cfg("smollm2"))
    lm, tok = load_lm(lm_cfg(str(local)))
    ids = ref_tok("The cat sat on the", return_tensors="pt").input_ids
    assert tok("The cat sat on the").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref(ids).logits)
    with pytest.raises(FusionBenchError, match="names a GGUF file, but there is no file"):
        load_lm(lm_cfg(str(tmp_path / "missing.gguf")))
    with pytest.raises(FusionBenchError, match="looks like a local path, but nothing is there"):
        load_lm(lm_cfg(str(tmp_path / "no_such_checkpoint")))
