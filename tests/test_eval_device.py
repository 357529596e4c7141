"""``eval.device``: where a run's evaluation (and its base LM's text scores) compute. ``auto``
follows training, and falls back to the CPU on a machine without the trainer's accelerator (a GPU
run evaluated on a laptop); a device this machine lacks is one clear error before any asset loads;
the default changes no config hash; the row records where it was evaluated."""
import pytest
import torch

from fusionbench.cli import main
from fusionbench.config import config_hash
from fusionbench.errors import FusionBenchError
from fusionbench.results import device_label, read_results
from fusionbench.runner import eval_device, training_device
from tests.helpers import TINY, tiny_cfg


def test_auto_follows_training_and_falls_back_to_the_cpu():
    cfg = tiny_cfg()  # trainer.accelerator: cpu
    assert cfg.eval.device == "auto" and training_device(cfg.trainer) == torch.device("cpu")
    assert eval_device(cfg) == torch.device("cpu") and eval_device(tiny_cfg("eval.device=cpu")) == torch.device("cpu")
    gpu = tiny_cfg("trainer.accelerator=gpu")
    if torch.cuda.is_available():
        assert training_device(gpu.trainer) == eval_device(gpu) == torch.device("cuda", 0)
    else:  # Lightning refuses a GPU trainer here: evaluated where it can be, on the CPU
        assert training_device(gpu.trainer) is None and eval_device(gpu) == torch.device("cpu")
    assert config_hash(tiny_cfg("eval.device=auto")) == config_hash(cfg) != config_hash(tiny_cfg("eval.device=cpu"))


def test_a_name_torch_does_not_know_is_refused_when_the_config_loads():
    with pytest.raises(FusionBenchError, match="eval.device must be 'auto' or a torch device .* got 'gpu0'"):
        tiny_cfg("eval.device=gpu0")


@pytest.mark.parametrize("device, message", [
    ("cuda:63", "eval.device=cuda:63: this machine has no such device"),
    ("xpu", "eval.device=xpu: this machine has no such device"),
    ("meta", "eval.device=meta: a meta tensor has no values"),
])
def test_a_device_this_machine_lacks_is_one_error_before_any_asset_loads(tmp_path, capsys, device, message):
    results = tmp_path / "res.jsonl"
    results.write_text('{"earlier": "row"}\n')
    assert main(["run", str(TINY), f"output_dir={tmp_path / 'runs'}", f"results_file={results}",
                 f"eval.device={device}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "preparing" not in err
    assert results.read_text() == '{"earlier": "row"}\n' and not list(tmp_path.glob("runs/**/*.ckpt"))


def test_the_row_says_where_it_was_evaluated_and_cpu_is_auto_here(tmp_path):
    """On a machine without an accelerator ``auto`` is the CPU: the same numbers as ``eval.device=cpu``
    (base text scores, choice, generation, probes), and both rows name the CPU."""
    common = ["fusion=mlp", "eval.text_suite=true", "eval.text.tasks=[]", "eval.text.gen_tasks=[]",
              "eval.text.ppl_chunks=2", "eval.text.ppl_chunk_tokens=64", "eval.probes=true", "eval.probe_train=16",
              "eval.probe_test=8", f"results_file={tmp_path / 'res.jsonl'}"]
    for i, device in enumerate(("auto", "cpu")):
        assert main(["run", str(TINY), *common, f"output_dir={tmp_path / f'runs{i}'}", f"eval.device={device}"]) == 0
    df = read_results(tmp_path / "res.jsonl")
    assert list(df.eval_device) == [device_label(torch.device("cpu"))] * 2 == list(df.device)
    assert list(df.cache_text_prefix_used) == [True, True]  # mlp's frozen prompt prefix, not compiled
    metrics = [c for c in df.columns if c.startswith(("mm/", "probe/", "text/", "forgetting/"))]
    assert any(c.startswith("probe/") for c in metrics) and any(c.startswith("forgetting/") for c in metrics)
    a, b = df.iloc[0], df.iloc[1]
    assert all(a[c] == b[c] or (a[c] != a[c] and b[c] != b[c]) for c in metrics)


def test_compiled_training_still_scores_a_frozen_text_path_exactly(tmp_path):
    """``trainer.compile`` compiles the decoder layers for training; every score (the forgetting
    curve during training, the final evaluation) runs them eagerly, the kernels the base LM was
    scored with, so the frozen text path of mlp forgets exactly 0 (no float-rounding residue)."""
    import json

    assert main(["run", str(TINY), "fusion=mlp", "trainer.compile=true", "trainer.max_steps=4", "eval.text_suite=true",
                 "eval.text.tasks=[]", "eval.text.gen_tasks=[]", "eval.text.ppl_chunks=2", "eval.text.ppl_chunk_tokens=64",
                 "eval.curve_every_n_steps=2", "eval.curve_prose_chunks=2", f"output_dir={tmp_path / 'runs'}",
                 f"results_file={tmp_path / 'res.jsonl'}"]) == 0
    row = read_results(tmp_path / "res.jsonl").iloc[0]
    assert not row["cache_text_prefix_used"] and row["cache_text_prefix_used"] is not None  # compiled: off
    zeros = [c for c in row.index if c.startswith("forgetting/") or c == "text/kl"]
    assert "text/kl" in zeros and "forgetting/austen/delta_log_ppl" in zeros
    assert all(row[c] == 0 for c in zeros), {c: row[c] for c in zeros}
    curve = json.loads(row["curve"])
    assert [p["step"] for p in curve] == [0, 2, 4] and "forgetting/austen/delta_log_ppl" in curve[-1]
    assert all(p[k] == 0 for p in curve for k in p if k.startswith("forgetting/") or k == "kl"), curve


def test_the_base_scores_cache_key_is_plain_on_an_accelerator(monkeypatch):
    """Off the CPU the key also names the accelerator type, CUDA and torch versions; it must still
    hash (``torch.__version__`` is a ``TorchVersion``, which omegaconf refused: every point of the
    first GPU sweep failed there, before training). The CPU key names none of them."""
    from fusionbench import runner
    from fusionbench.runner import base_text_key

    label = runner.device_label  # naming a GPU asks CUDA, which this machine may lack
    monkeypatch.setattr(runner, "device_label", lambda d: "NVIDIA H200" if d.type == "cuda" else label(d))
    cfg = tiny_cfg()
    cpu = base_text_key(cfg, torch.device("cpu"))
    gpu = base_text_key(cfg, torch.device("cuda", 0))
    assert cpu != gpu != base_text_key(cfg, torch.device("cuda", 0), part="curve")
    assert gpu == base_text_key(cfg, torch.device("cuda", 0)) and cpu == base_text_key(cfg, torch.device("cpu"))


def test_the_base_scores_cache_key_names_the_cpus_numeric_path(monkeypatch):
    """Two CPUs sold under one name ("AMD EPYC") scored the base LM differently (its log-ppl on the
    study's prose: 3.7705924 and 3.7706013). The cache can outlive its machine (a persistent home on
    another CPU), and exact-zero forgetting needs the base scored by the trained model's kernels: the
    CPU key names the instruction set and the CPU's family/model, not only its name."""
    from fusionbench import runner
    from fusionbench.runner import base_text_key

    cfg = tiny_cfg()
    here = base_text_key(cfg, torch.device("cpu"))
    identity = runner.cpu_identity()
    for other in ({"cpu_capability": "AVX2"}, {"cpu_model": "AuthenticAMD 25/1/1"}):
        monkeypatch.setattr(runner, "cpu_identity", lambda other=other: {**identity, **other})
        assert base_text_key(cfg, torch.device("cpu")) != here, other
    monkeypatch.setattr(runner, "cpu_identity", lambda: dict(identity))
    assert base_text_key(cfg, torch.device("cpu")) == here


def test_auto_follows_where_the_stages_train_and_stages_on_two_devices_are_refused(monkeypatch):
    """A stage's ``trainer.accelerator`` beats the top-level one for its training, so ``auto``
    evaluates where the stages train (it followed the top level only: a recipe that put the GPU in its
    stages was scored on the CPU, against a base LM scored there). Stages on two devices cannot share
    one base score: one error naming them. This machine may lack a GPU: Lightning's answer is faked."""
    from fusionbench import runner

    monkeypatch.setattr(runner, "training_device", lambda t: torch.device("cuda", 0) if t.accelerator == "gpu"
                        else torch.device("cpu"))
    both = tiny_cfg("fusion=moe", "stages=[{name: dense, trainer: {accelerator: gpu}}, "
                                  "{name: upcycle, trainer: {accelerator: gpu}}]")
    assert both.trainer.accelerator == "cpu" and eval_device(both) == torch.device("cuda", 0)
    assert eval_device(tiny_cfg("fusion=moe", "stages=[{name: dense}, {name: upcycle}]")) == torch.device("cpu")
    one = tiny_cfg("fusion=moe", "stages=[{name: dense}, {name: upcycle, trainer: {accelerator: gpu}}]")
    with pytest.raises(FusionBenchError, match=r"stages would train on different devices \(dense: cpu, "
                                               r"upcycle: cuda:0\).*same trainer.accelerator"):
        eval_device(one)
    assert eval_device(tiny_cfg("fusion=moe", "stages=[{name: dense}, {name: upcycle}]", "eval.device=cpu")).type == "cpu"
