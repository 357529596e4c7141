import hashlib
import json
import re

import pytest
from omegaconf import OmegaConf

from fusionbench.config import config_hash, expand_grid, load_config
from fusionbench.errors import FusionBenchError
from tests.helpers import ROOT, TINY


def test_defaults_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 7\n  warmup_steps: 2\n  lr: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [base.yaml]\ntrainer:\n  lr: 0.25\nfusion: linear\n")
    cfg = load_config(child, ["trainer.batch_size=3"])
    assert (cfg.trainer.max_steps, cfg.trainer.lr, cfg.trainer.batch_size) == (7, 0.25, 3)
    assert cfg.fusion.name == "linear"


def test_fusion_override_switches_strategy_and_drops_old_options():
    cfg = load_config(TINY, ["fusion={name: mlp, hidden_size: 12}"])
    assert cfg.fusion.hidden_size == 12
    cfg = load_config(TINY, ["fusion={name: mlp, hidden_size: 12}", "fusion=linear"])
    assert cfg.fusion.name == "linear" and "hidden_size" not in cfg.fusion
    cfg = load_config(TINY, ["fusion=mlp", "fusion={name: moe, num_experts: 3}"])
    assert (cfg.fusion.name, cfg.fusion.num_experts) == ("moe", 3)
    cfg = load_config(TINY, ["fusion={name: mlp, hidden_size: 12}", "fusion={hidden_size: 5}"])
    assert (cfg.fusion.name, cfg.fusion.hidden_size) == ("mlp", 5)


@pytest.mark.parametrize("override, message", [
    (["trainer.max_stpes=3"], "unknown config key 'trainer.max_stpes' in the command-line overrides. Did you mean 'trainer.max_steps'?"),
    (["trainer.max_steps=abc"], "invalid config value for 'trainer.max_steps'"),
    (["fusion=mpl"], "unknown fusion strategy 'mpl'. Did you mean 'mlp'?"),
    (["fusion={name: mlp, hiden_size: 3}"], "unknown option 'fusion.hiden_size' for strategy 'mlp'. Did you mean 'fusion.hidden_size'?"),
    (["trainer.max_steps"], "not of the form key=value"),
    # numbers out of range: one line naming the key and the range, before any model or data is built
    (["trainer.lr=-1"], "trainer.lr=-1.0 is out of range: it must be a finite number > 0"),
    (["trainer.lr=nan"], "trainer.lr=nan is out of range"),
    (["trainer.lr=inf"], "trainer.lr=inf is out of range"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 is out of range: it must be >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is out of range: it must be >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is out of range: it must be >= 1"),
    (["trainer.devices=banana"], "trainer.devices='banana' is not a device count"),
    (["trainer.devices=0"], "trainer.devices=0 is not a device count"),
    (["eval.mm_items=-3"], "eval.mm_items=-3 is out of range: it must be >= 0"),
    (["trainer.warmup_steps=5"], "trainer.warmup_steps=5 is more than trainer.max_steps=3"),
    (["data.train_size=4"], "data.train_size=4 is smaller than trainer.batch_size=8: no full batch"),
    (["data.image_size=0"], "data.image_size=0 is out of range: it must be >= 8"),
    (["stages=[{name: main, trainer: {lr: -0.1}}]"], "stages[0] trainer.lr=-0.1 is out of range"),
    # strategy options out of their declared range (fusion.base.ranged; plain numbers: >= 0)
    (["fusion={name: mlp, hidden_size: -5}"], "fusion.hidden_size=-5 is out of range for strategy 'mlp': it must be >= 0"),
    (["fusion={name: qformer, num_heads: 0}"], "fusion.num_heads=0 is out of range for strategy 'qformer': it must be >= 1"),
    (["fusion={name: lora, dropout: 1.0}"], "fusion.dropout=1.0 is out of range for strategy 'lora': it must be in [0, 1)"),
    (["fusion={name: lora, alpha: 0}"], "fusion.alpha=0.0 is out of range for strategy 'lora': it must be > 0"),
    (["fusion={name: moe, z_coef: .nan}"], "fusion.z_coef=nan is out of range for strategy 'moe'"),
    (["fusion={name: moe, num_experts: 0}"], "fusion.num_experts=0 is out of range for strategy 'moe': it must be >= 1"),
    # an option every strategy has but only flamingo acts on
    (["fusion={name: mlp, text_path_drift: true}"], "fusion.text_path_drift=true does nothing for strategy 'mlp': "
                                                    "only flamingo has a text path to let drift"),
    # values YAML cannot parse name the key; a glued colon is explained
    (["grid={fusion:[linear, mlp]}"], "override grid: the value '{fusion:[linear, mlp]}' is not valid YAML"),
    (["fusion={name:mlp}"], "has the key 'name:mlp'; in a {key: value} mapping YAML needs a space after each colon"),
    (["seeds=[0,1"], "override seeds: the value '[0,1' is not valid YAML"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(FusionBenchError) as err:
        load_config(TINY, override)
    assert message in str(err.value)


def test_mistyped_key_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision:\n  sorce: tiny_cnn\n")
    with pytest.raises(FusionBenchError, match=r"unknown config key 'vision.sorce'.*bad.yaml.*'vision.source'"):
        load_config(bad)


def test_grid_expands_and_validates_every_point():
    cfg = load_config(TINY, ["grid={fusion: [linear, mlp], seed: [0, 1]}"])
    points = expand_grid(cfg)
    assert [(p.fusion.name, p.seed) for p in points] == [("linear", 0), ("linear", 1), ("mlp", 0), ("mlp", 1)]
    assert len({config_hash(p) for p in points}) == 4
    with pytest.raises(FusionBenchError, match="unknown fusion strategy"):
        expand_grid(load_config(TINY, ["grid={fusion: [linear, nope]}"]))


def test_grid_and_stages_overrides_replace_rather_than_merge(tmp_path):
    child = tmp_path / "c.yaml"
    child.write_text(f"defaults: [{TINY}]\ngrid:\n  fusion: [linear, mlp]\nstages: [{{name: main}}]\n")
    assert len(expand_grid(load_config(child))) == 2
    cfg = load_config(child, ["grid={}", "stages=[]"])
    assert len(expand_grid(cfg)) == 1 and list(cfg.stages) == []
    assert dict(load_config(child, ["grid={seed: [1, 2]}"]).grid) == {"seed": [1, 2]}


@pytest.mark.parametrize("overrides, names", [
    (["fusion=qformer"], "grid.variant[0] (mlp), grid.variant[1] (blind)"),  # would have trained mlp twice
    (["fusion.hidden_size=8"], "grid.variant[0] (mlp), grid.variant[1] (blind)"),  # a strategy switch drops it
    (["trainer.lr=0.5"], "grid.variant[1] (blind)"),  # a dotted key in a variant
    (["data.images=blank"], "grid.variant[1] (blind)"),
    (["trainer={lr: 0.5}"], "grid.variant[1] (blind)"),  # a mapping over a variant's leaf
    (["seed=7"], "(seeds)"),
])
def test_an_override_the_grid_would_replace_is_refused(tmp_path, overrides, names):
    """A grid point applies its grid values after the command line: an override of a key the grid
    sets used to vanish silently (quickstart.yaml fusion=qformer trained mlp twice)."""
    exp = tmp_path / "g.yaml"
    exp.write_text(f"defaults: [{TINY}]\nseeds: [0, 1]\ngrid:\n  variant:\n    - {{label: mlp, fusion: {{name: mlp}}}}\n"
                   "    - {label: blind, fusion: {name: mlp}, data.images: shuffled, trainer: {lr: 0.1}}\n")
    with pytest.raises(FusionBenchError, match="the grid sets it too") as e:
        load_config(exp, overrides)
    assert names in str(e.value) and "replaced without effect" in str(e.value)
    # keys the grid leaves alone, a new grid, or no grid at all: as before
    assert load_config(exp, ["trainer.batch_size=4", "trainer.max_steps=3"]).trainer.batch_size == 4
    assert load_config(exp, ["grid={}", "seeds=[]", "fusion=qformer", "seed=7"]).fusion.name == "qformer"
    assert [p.fusion.name for p in expand_grid(load_config(exp, ["grid={fusion: [linear]}", "trainer.lr=0.5"]))] == ["linear"] * 2
    with pytest.raises(FusionBenchError, match="override fusion.r: the grid sets it too .grid.fusion.r."):
        load_config(TINY, ["grid={fusion.r: [2, 4]}", "fusion=lora", "fusion.r=8"])
    # a dotted key given a mapping; a variant's stages (their trainer wins over trainer.*)
    with pytest.raises(FusionBenchError, match="override eval.text: the grid sets it too"):
        load_config(TINY, ["grid={variant: [{eval.text.n_per_task: 3}]}", "eval.text={n_per_task: 5}"])
    staged = "grid={variant: [{label: s, stages: [{name: main, trainer: {max_steps: 2}}]}, {label: plain, fusion: linear}]}"
    with pytest.raises(FusionBenchError, match=r"override trainer.max_steps: the grid sets it too .grid.variant\[0\] "
                                               r"\(s\), stage main\)"):
        load_config(TINY, [staged, "trainer.max_steps=3"])
    # `sweep --only` leaves the point that sets it out: allowed; an axis of mappings sets only their keys
    assert load_config(TINY, [staged, "trainer.max_steps=3"], only=["plain"]).trainer.max_steps == 3
    with pytest.raises(FusionBenchError, match="the grid sets it too"):
        load_config(TINY, [staged, "trainer.max_steps=3"], only=["s"])
    points = expand_grid(load_config(TINY, ["grid={trainer: [{lr: 0.1}, {lr: 0.2}]}", "trainer.batch_size=4"]))
    assert [(p.trainer.lr, p.trainer.batch_size) for p in points] == [(0.1, 4), (0.2, 4)]


def test_a_key_every_stage_sets_is_refused_as_an_override_and_stages_i_sets_one_stage(tmp_path, capsys):
    """A config's own stages (moe.yaml's dense / unfreeze / upcycle) set trainer keys that used to
    beat a `trainer.max_steps=...` override silently. A key every stage sets is refused (it would have
    no effect), a key some stages set applies to the others with a note, and
    `stages.<i>.<key>=...` sets one stage's key."""
    exp = tmp_path / "s.yaml"
    exp.write_text(f"defaults: [{TINY}]\nfusion: {{name: moe}}\nstages:\n  - {{name: dense, trainer: {{max_steps: 4}}}}\n"
                   "  - {name: upcycle, trainer: {max_steps: 6, lr: 0.01}}\n")
    with pytest.raises(FusionBenchError, match=r"override trainer.max_steps: every stage sets it too \(the config's "
                                               r"stages: stages\[0\] \(dense\), stages\[1\] \(upcycle\)\).*"
                                               r"stages.0.trainer.max_steps=..., stages.1.trainer.max_steps="):
        load_config(exp, ["trainer.max_steps=3"])
    with pytest.raises(FusionBenchError, match=r"every stage sets it too \(the stages given on the command line"):
        load_config(exp, ["stages=[{name: dense, trainer: {max_steps: 2}}]", "trainer={max_steps: 3}"])
    # a key only some stages set: it applies to the others, and says so
    assert load_config(exp, ["trainer.lr=0.5"]).trainer.lr == 0.5
    assert "override trainer.lr applies to stage(s) dense only; stages[1] (upcycle) set their own" in capsys.readouterr().err
    # keys no stage sets, a stage's own key, or no stages: allowed, and they land where they should
    cfg = load_config(exp, ["trainer.batch_size=4", "stages.1.trainer.max_steps=9", "stages.0.data={images: blank}"])
    assert (cfg.trainer.batch_size, cfg.stages[1].trainer.max_steps, cfg.stages[1].trainer.lr) == (4, 9, 0.01)
    assert cfg.stages[0].data.images == "blank" and cfg.stages[0].trainer.max_steps == 4
    assert load_config(exp, ["stages=[]", "trainer.max_steps=3"]).trainer.max_steps == 3
    assert load_config(exp, ["stages=[{name: dense}]", "stages.0.trainer.max_steps=5"]).stages[0].trainer.max_steps == 5
    for bad, msg in [("stages.2.trainer.max_steps=1", "this config's stages: 0 (dense), 1 (upcycle)"),
                     ("stages.dense.trainer.max_steps=1", "stages.<i> takes a stage's index"),
                     ("stages.0.traner.max_steps=1", "a stage has the keys name, trainer and data"),
                     ("stages.0.trainer.max_stepz=1", "unknown config key 'trainer.max_stepz' in stages[0] (dense)"),
                     ("stages.0.trainer.max_steps=abc", "invalid config value for 'trainer.max_steps' in stages[0] (dense)")]:
        with pytest.raises(FusionBenchError, match=re.escape(msg)):
            load_config(exp, [bad])
    with pytest.raises(FusionBenchError, match=r"the earlier 'stages.1.trainer.max_steps=9' would be lost"):
        load_config(exp, ["stages.1.trainer.max_steps=9", "stages=[{name: dense}]"])
    # a grid whose every point brings its own stages: the config's stages do not apply, the grid's check does
    assert load_config(exp, ["grid={variant: [{label: a, stages: [{name: main}]}]}", "fusion=linear",
                             "trainer.max_steps=3"]).trainer.max_steps == 3
    # a variant whose stages set a key only in some stages: the override reaches the others, as above
    partial = "grid={variant: [{label: m, stages: [{name: dense}, {name: upcycle, trainer: {warmup_steps: 1}}]}]}"
    assert load_config(exp, [partial, "trainer.warmup_steps=0"]).trainer.warmup_steps == 0
    # a grid value every stage of its point overrides has no effect either
    for grid in ("grid={trainer.max_steps: [2, 3]}", "grid={variant: [{label: a, trainer.max_steps: 2}]}"):
        with pytest.raises(FusionBenchError, match=r"sets trainer.max_steps, but every stage of that point sets its own "
                                                   r"\(dense, upcycle\)"):
            expand_grid(load_config(exp, [grid]))
    assert [p.trainer.lr for p in expand_grid(load_config(exp, ["grid={trainer.lr: [0.1, 0.2]}"]))] == [0.1, 0.2]


def test_smoke_script_gives_moe_its_steps_in_stages_not_a_refused_trainer_override(tmp_path):
    """benchmarks/smoke_embedded_default.sh's overrides for moe (whose stages set their own steps)
    load: `run` is swapped for `sweep --dry-run`, which loads and validates the config and trains nothing."""
    import os
    import subprocess
    import sys

    fb = tmp_path / "fb"
    fb.write_text(f"""#!/usr/bin/env bash
[ "$1" = list ] && {{ echo "fusion strategies: moe, linear"; exit 0; }}
[ "$1" = run ] && shift && exec {sys.executable} -m fusionbench sweep "$@" --dry-run
exit 3
""")
    fb.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "smoke_embedded_default.sh"),
                           f"output_dir={tmp_path}", f"results_file={tmp_path / 'r.jsonl'}"],
                          env={**os.environ, "FB": str(fb)}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("seed=0") == 2 and "=== moe" in proc.stdout


def test_config_hash_ignores_output_locations():
    a = load_config(TINY, ["output_dir=/tmp/a", "results_file=/tmp/a.jsonl"])
    b = load_config(TINY, ["output_dir=/tmp/b"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(TINY, ["seed=3"]))


def test_seeds_expand_innermost_and_are_not_in_the_hash():
    cfg = load_config(TINY, ["grid={fusion: [linear, mlp]}", "seeds=[0, 1, 2]"])
    points = expand_grid(cfg)
    assert [(p.fusion.name, p.seed) for p in points] == [(f, s) for f in ("linear", "mlp") for s in (0, 1, 2)]
    assert config_hash(points[0]) == config_hash(load_config(TINY, ["fusion=linear"]))
    with pytest.raises(FusionBenchError, match="either as 'seeds"):
        expand_grid(load_config(TINY, ["grid={seed: [0, 1]}", "seeds=[3]"]))
    with pytest.raises(FusionBenchError, match="duplicates"):
        expand_grid(load_config(TINY, ["seeds=[1, 1]"]))


def test_keys_added_later_do_not_change_old_hashes_at_their_default():
    """Rows written before a schema key existed keep their config hash (a sweep still finds them
    finished); the key at a non-default value is a different point."""
    from fusionbench.config import HASH_NEUTRAL_DEFAULTS, config_hash

    cfg = load_config(ROOT / "experiments" / "main.yaml", ["seeds=[]"])
    old = OmegaConf.to_container(cfg)
    for dotted in HASH_NEUTRAL_DEFAULTS:
        *section, leaf = dotted.split(".")
        del (old[section[0]] if section else old)[leaf]
    blob = json.dumps({k: v for k, v in old.items() if k not in ("output_dir", "results_file", "grid", "seeds", "contrasts")},
                      sort_keys=True, default=str)
    assert config_hash(cfg) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    for dotted, default in HASH_NEUTRAL_DEFAULTS.items():
        other = {bool: lambda d: not d, int: lambda d: d + 1, list: lambda d: ["some_plugin_module"],
                 str: lambda d: {"fused": "foreach", "csv": "tensorboard", "stretch": "pad", "auto": "cpu"}[d]}[type(default)](default)
        changed = cfg.copy()
        OmegaConf.update(changed, dotted, other)  # (a logger's package need not be installed to hash it)
        assert config_hash(changed) != config_hash(cfg)


def test_a_strategy_switch_then_its_options_on_the_command_line():
    cfg = load_config(TINY, ["fusion=qformer", "fusion.num_queries=4"])
    assert cfg.fusion.name == "qformer" and cfg.fusion.num_queries == 4
    with pytest.raises(FusionBenchError, match="Did you mean 'fusion.dropout'"):
        load_config(TINY, ["fusion=lora", "fusion.dropotu=0.2"])


def test_missing_defaults_file_names_the_file_that_refers_to_it(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("defaults: [nope.yaml]\nname: x\n")
    with pytest.raises(FusionBenchError, match=r"nope.yaml \(named in the defaults of .*child.yaml\)"):
        load_config(child)


def test_every_experiment_config_passes_the_range_checks():
    from fusionbench.config import grid_points

    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        grid_points(load_config(path))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_max_length_beyond_the_lm_context_is_refused_before_training(tmp_path, capsys, arch):
    """Every LM family: a prompt budget longer than the LM's positions is one line, before training
    (GPT-2 used to fail with an IndexError deep in its position embedding, Llama not at all)."""
    from fusionbench.cli import main

    code = main(["run", str(TINY), f"lm.tiny.arch={arch}", "lm.tiny.max_position_embeddings=64",
                 "trainer.max_length=128", f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'r.jsonl'}"])
    assert code == 2
    assert "trainer.max_length=128 is longer than the LM's context (64 positions" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_every_strategy_default_is_within_its_declared_ranges():
    import dataclasses

    from fusionbench.config import expand_grid

    with pytest.raises(FusionBenchError, match=r"fusion\.hidden_size=-1 is out of range for strategy 'mlp'"):
        expand_grid(load_config(TINY, ["fusion=mlp", "grid={fusion.hidden_size: [8, -1]}"]))  # each grid point too

    from fusionbench.fusion import FUSIONS
    from fusionbench.fusion.base import _range_rule

    for name in FUSIONS.names():
        options = FUSIONS.get(name).default_options()  # raises if a default broke its own range
        for f in dataclasses.fields(FUSIONS.get(name).Options):
            if f.type in (int, float, "int", "float"):  # a shipped option states its range, even >= 0
                assert "low" in f.metadata, f"{name}: fusion.{f.name} is declared without ranged()"
            if "low" in f.metadata:
                ok, rule = _range_rule(f.metadata)
                assert ok(float(options[f.name])) and not ok(f.metadata["low"] - 1), (name, f.name, rule)


def test_a_plain_numeric_option_may_be_negative_but_must_be_finite():
    """Only a range declared with ranged() bounds a number (a plugin's gate_init: float = -2.0 is fine)."""
    from dataclasses import dataclass

    from fusionbench.fusion.base import FusionOptions, check_option_ranges

    @dataclass
    class GateOptions(FusionOptions):
        gate_init: float = -2.0

    check_option_ranges("probe", GateOptions, OmegaConf.structured(GateOptions))
    with pytest.raises(FusionBenchError, match="fusion.gate_init=inf is out of range for strategy 'probe': it must "
                                               "be a finite number"):
        check_option_ranges("probe", GateOptions, OmegaConf.merge(OmegaConf.structured(GateOptions),
                                                                  {"gate_init": float("inf")}))


def test_a_stage_part_that_is_not_a_mapping_is_one_clear_error():
    from fusionbench.errors import FusionBenchError

    for bad in ("stages.0.trainer=5", "stages.1.data=[1]"):
        with pytest.raises(FusionBenchError, match=r"stages\[\d\] \(\w+\)\.(trainer|data) must be a mapping of \1 keys \(e\.g\. \{\w+: \d+\}\)"):
            load_config(ROOT / "experiments" / "fusion" / "moe.yaml", [bad])
