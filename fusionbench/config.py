"""Experiment configuration: an omegaconf structured schema, YAML files with ``defaults`` inheritance,
dotlist overrides, and validation that fails before any compute with one clear message."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusionbench.errors import FusionBenchError, did_you_mean, first_line


@dataclass
class TinyLMConfig:
    #: decoder family of the random-init LM: llama, qwen2, gemma, gpt2 (tests cover each)
    arch: str = "llama"
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512


@dataclass
class LMConfig:
    #: "tiny" (random-init Llama from ``tiny``), "smollm2" (embedded default), or any HF hub
    #: name / local path of a causal LM.
    source: str = "smollm2"
    dtype: str = "float32"
    tiny: TinyLMConfig = field(default_factory=TinyLMConfig)


#: how a non-square image reaches a vision encoder's square input (``vision.resize``)
RESIZE_MODES = ("stretch", "pad", "crop")


@dataclass
class VisionConfig:
    #: "tiny_cnn" / "tiny_vit" (random-init), "efficientnet_lite0" (embedded default), or an HF
    #: hub name / local path of a CLIP / SigLIP / ViT vision tower.
    source: str = "efficientnet_lite0"
    #: input resolution the encoder sees (images are resized to it)
    image_size: int = 224
    #: a non-square image: ``stretch`` to the square (the aspect ratio is lost; said once per run),
    #: ``pad`` to a square with the mean colour first (LLaVA-1.5) or ``crop`` its centre (CLIP)
    resize: str = "stretch"
    #: average-pool the encoder's feature grid to this many tokens (a square number; 0: keep all)
    pool_tokens: int = 0
    #: compute a frozen encoder's features once per image and reuse them (fusionbench.feature_cache)
    feature_cache: bool = True
    #: tiny encoders only: width and depth
    width: int = 32
    depth: int = 2
    patch_size: int = 8


@dataclass
class DataConfig:
    #: registered dataset name (``fusionbench.data.DATASETS``): scenes, cifar_grid, ...
    name: str = "scenes"
    train_size: int = 2000
    #: val: model selection and curves; test: the reported numbers (the same items for every
    #: strategy and seed: built from ``data.seed``, not the run's seed)
    val_size: int = 200
    test_size: int = 300
    #: what the *training* images are: ``real``, ``shuffled`` (each training question paired with
    #: another example's image, a fixed derangement) or ``blank`` (one grey image): the trained blind
    #: baselines, which learn whatever the questions alone predict. Evaluation always uses real images.
    images: str = "real"
    #: side of the generated images in pixels
    image_size: int = 64
    seed: int = 0
    #: keep only these question types (empty: all)
    qtypes: list[str] = field(default_factory=list)
    #: source-specific options (e.g. hub dataset path and column names)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    #: machines for multi-node Lightning strategies (ddp / fsdp launched by e.g. SLURM or torchrun)
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    log_every_n_steps: int = 10
    #: longest tokenised example (prompt + answer + image tokens); longer ones are an error
    max_length: int = 256
    #: save a Lightning checkpoint of the trainable modules at the end
    checkpoint: bool = True
    #: also every N steps (0: only at the end); a killed run resumes from the newest one
    checkpoint_every_n_steps: int = 0
    #: regional torch.compile of every decoder block (fusionbench.runner.compile_decoder_layers);
    #: off by default: on a 2-core CPU a cold compile costs ~50-190 s for ~1.1x, on a GPU it is
    #: usually worth it. It turns ``cache_text_prefix`` off (the cache made every block recompile);
    #: rows say ``cache_text_prefix_used``
    compile: bool = False
    #: AdamW implementation: ``fused`` (one kernel over all parameters; CPU and CUDA) or
    #: ``foreach`` (torch's multi-tensor default). The same update rule, different float rounding;
    #: fused is ~6x faster on CPU over the 107M visual-expert parameters. Rows before this option
    #: existed (results/main_v1.jsonl, seeds 0-1) used foreach.
    optimizer_impl: str = "fused"
    #: training forwards compute a prompt prefix shared by the batch (the system prompt: ~19 of
    #: ~52 tokens per quickstart example) once and reuse its KV cache, for strategies whose text
    #: before the image never changes (``FusionStrategy.frozen_text_prefix``); the same math,
    #: ~1/3 less LM compute there. Not with ``compile`` (see there)
    cache_text_prefix: bool = True
    #: compute-matched training: when > 0, max_steps is replaced by how many steps fit this many
    #: training FLOPs (forward + backward, counted on a real batch with torch's FLOP counter)
    flops_budget: float = 0.0
    #: validation loss (and choice accuracy on ``eval.val_items`` val items) every N steps (0: once,
    #: at the end); batches per validation loss
    val_every_n_steps: int = 0
    limit_val_batches: int = 4
    #: Lightning logger of the run directory: ``csv`` (default), ``tensorboard``, ``mlflow`` (local
    #: file store under the run directory) or ``wandb`` (offline), each needing its package
    logger: str = "csv"


@dataclass
class TextEvalConfig:
    #: BIG-bench multiple-choice tasks scored by log-likelihood, ``name`` or ``name:format``. These
    #: schema defaults are small, quick tasks (70 and 100 items) for tests; the experiments use the
    #: tasks kept by measurement (experiments/base.yaml, results/text_task_selection.jsonl)
    tasks: list[str] = field(default_factory=lambda: ["general_knowledge", "phrase_relatedness"])
    n_per_task: int = 50
    #: perplexity on held-out natural text (Jane Austen); 0 chunks disables it
    ppl_chunks: int = 16
    ppl_chunk_tokens: int = 128
    seed: int = 1234
    #: generative BIG-bench tasks (examples with a target; greedy generation, exact match): the
    #: forgetting PaLM-E reported was on generation
    gen_tasks: list[str] = field(default_factory=list)
    gen_items: int = 50
    gen_max_new_tokens: int = 8
    #: prompt format of the multiple-choice items: "bigbench" (choices listed, as BIG-bench) or
    #: "plain" (cloze: "Question: ... Answer:"); chosen by measurement (fusionbench text-tasks)
    format: str = "bigbench"
    #: "suite": fusionbench's own scorer (fast on CPU); "lm_eval": the same kind of tasks as local
    #: lm-evaluation-harness task configs through lm-eval (standard metrics and stderr): a
    #: ``name:format`` entry is that BIG-bench task offline, in the suite's prompt format; a bare name
    #: is one of lm-eval's tasks (the offline general_knowledge, phrase_relatedness, social_iqa,
    #: timedial, goal_step_wikihow/goal_inference, or any lm-eval task if its dataset is reachable).
    #: gen_tasks are scored by the suite only (lm_eval needs gen_tasks: [])
    backend: str = "suite"


@dataclass
class EvalConfig:
    #: the evaluators to run, in order (fusionbench.evaluation.EVALUATORS; one file each in
    #: fusionbench/evaluation/metrics/); each also honours its own switch below
    metrics: list[str] = field(default_factory=lambda: ["choice", "generation", "captions", "probes",
                                                        "efficiency", "text"])
    #: primary multimodal metric: choice scoring of every test item (fusionbench.evaluation.choice)
    choice: bool = True
    #: with it, the image controls: shuffled images (a derangement), no image, image gain + 95% CI
    controls: bool = True
    #: secondary: the first N test items scored by exact match of generated answers (0: off)
    mm_items: int = 200
    max_new_tokens: int = 4
    batch_size: int = 16
    text: TextEvalConfig = field(default_factory=TextEvalConfig)
    #: run the text suite at all (before and after training)
    text_suite: bool = True
    #: the efficiency block (eff/*): parameters, FLOPs per text token / image token / image and per
    #: training step, counted with torch.utils.flop_counter on ``efficiency_items`` val examples
    efficiency: bool = True
    efficiency_items: int = 4
    #: depth probes (probe/*): per LM layer, linear probes at the question's last token for the
    #: colour / column / row of a single-object scene, and image-text cosine / CKA per layer
    probes: bool = False
    probe_train: int = 128
    probe_test: int = 64
    #: caption metrics (CIDEr, BLEU-4, ROUGE-L via pycocoevalcap) on the test split's captions, with
    #: a text-only baseline; train on ``data.name: scenes_captions`` for captions worth scoring
    captions: bool = False
    caption_items: int = 100
    caption_max_new_tokens: int = 48
    #: val items scored by choice accuracy at every validation (the convergence curve; 0: off)
    val_items: int = 96
    #: also the image controls at every validation: ``val/acc_shuffled`` and ``val/image_gain``
    #: (+ 95% CI) on the same val items (3x the cost; the pilot's image-gain-vs-steps curve)
    val_controls: bool = False
    #: a run has plateaued when its val LM loss improved by less than this fraction over the last
    #: third of its validation points (``converged`` in the row; needs >= 3 points)
    plateau_tol: float = 0.02
    #: forgetting curve: score a fixed slice of the text suite every N training steps (0: off)
    curve_every_n_steps: int = 0
    #: the slice: items per task and prose chunks
    curve_items_per_task: int = 8
    curve_prose_chunks: int = 2
    #: where evaluation runs: ``auto`` (where training runs: rank 0's device as Lightning resolves
    #: ``trainer.accelerator`` / ``devices`` on this machine, a stage's over the top-level ones (every stage
    #: must train on one device), the CPU where this machine has none of them, as when a GPU run is
    #: evaluated on a laptop) or a torch device (``cpu``, ``cuda``,
    #: ``cuda:1``, ``mps``). The base LM's text scores are computed on the same device (the
    #: forgetting curve's on the training device), so a frozen text path still forgets exactly 0
    device: str = "auto"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    #: ``{name: <strategy>, ...strategy options}``; a bare string is a name
    fusion: Any = field(default_factory=lambda: {"name": "mlp"})
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: multi-stage recipe: a list of ``{name, trainer?}`` overrides, run in order;
    #: empty means one stage from the top-level settings
    stages: list[Any] = field(default_factory=list)
    #: ``{dotted.key: [values]}``: ``fusionbench run`` runs the cartesian product, one row each.
    #: The axis ``variant`` takes a list of mappings ``{dotted.key: value, ..., label?: str}``
    #: applied together (e.g. a strategy with its own ``stages``)
    grid: dict[str, Any] = field(default_factory=dict)
    #: run every point once per seed (``seed`` is then ignored); ``fusionbench report`` aggregates
    #: the seeds into a mean and a 95% confidence interval
    seeds: list[int] = field(default_factory=list)
    #: pre-registered contrasts the report tests on this experiment's rows:
    #: ``[{name, a, b, metric (default mm/choice/acc), expect: greater|less}]``, ``a``/``b`` naming
    #: points by their report label (a strategy, or a grid variant's label); ``b_table: main`` (or
    #: ``a_table``) takes that side from another results table (same test items required)
    contrasts: list[Any] = field(default_factory=list)
    #: strategies / datasets / evaluators defined outside the package: module names or ``.py`` files
    #: (relative to the working directory), imported before the config is validated
    #: (:mod:`fusionbench.plugins`; installed packages can use the ``fusionbench.plugins`` entry point)
    plugins: list[str] = field(default_factory=list)
    #: where run directories (checkpoints, logs) go
    output_dir: str = "runs"
    #: the results table this run appends its row to. ``results/*.jsonl`` are the committed
    #: reference tables (the paper's study configs name theirs); ``results/local/`` is git-ignored,
    #: for a user's own runs (``fusionbench report --results results/local``)
    results_file: str = "results/local/runs.jsonl"


_SCHEMA = OmegaConf.structured(ExperimentConfig)
#: trainer.logger values (fusionbench.runner.make_logger) and the packages one of which each needs
LOGGERS = {"csv": (), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a YAML file, resolving ``defaults: [base.yaml, ...]`` relative to it (later wins)."""
    path = path.resolve()
    if not path.exists():
        raise FusionBenchError(f"config file not found: {path}"
                               + (f" (named in the defaults of {seen[-1]})" if seen else ""))
    if path in seen:
        raise FusionBenchError(f"config inheritance loop at {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise FusionBenchError(f"cannot parse {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise FusionBenchError(f"{path} must hold a mapping at the top level")
    defaults = node.pop("defaults", [])
    merged = OmegaConf.create()
    for base in defaults:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), seen + (path,)))
    return OmegaConf.merge(merged, node)


def _check_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if "=" not in item:
            raise FusionBenchError(f"override {item!r} is not of the form key=value")
    return list(overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                validate_fusion: bool = True, only: list[str] | None = None) -> DictConfig:
    """YAML + overrides merged onto the schema. Unknown keys and wrong types raise
    :class:`FusionBenchError` naming the key, as does an override of a key the grid sets (of the
    points ``only``, ``sweep --only``'s labels, selects)."""
    raw = _read_yaml(Path(path)) if path is not None else OmegaConf.create()
    try:
        cfg = OmegaConf.merge(_SCHEMA, raw)
    except OmegaConfBaseException as e:
        raise FusionBenchError(_explain(e, path)) from None
    try:
        if overrides:
            cfg = _merge_overrides(cfg, _check_overrides(overrides))
    except OmegaConfBaseException as e:
        raise FusionBenchError(_explain(e, "the command-line overrides")) from None
    if overrides:
        _no_override_under_the_grid(cfg, overrides, only)
    return finalise(cfg, validate_fusion=validate_fusion)


def _grid_leaves(key: str, value: Any) -> list[str]:
    """The dotted keys a grid value sets: ``fusion`` with a ``name`` replaces the whole strategy
    (one leaf), other mappings set their leaves."""
    if isinstance(value, DictConfig) and not (key == "fusion" and "name" in value):
        return [leaf for k, v in value.items() for leaf in _grid_leaves(f"{key}.{k}", v)]
    return [key]


def _override_leaves(key: str, value: Any) -> list[str]:
    """The dotted keys an override sets (``fusion=<name>`` sets the strategy's name only: a grid
    may then set that strategy's options)."""
    if isinstance(value, DictConfig):
        return [leaf for k, v in value.items() for leaf in _override_leaves(f"{key}.{k}", v)]
    return ["fusion.name"] if key == "fusion" else [key]


def _no_override_under_the_grid(cfg: DictConfig, overrides: list[str], only: list[str] | None = None) -> None:
    """A grid point is the config with its grid values applied last: a command-line override of a
    key the grid also sets would be replaced without a word (``quickstart.yaml fusion=qformer``
    would train mlp twice). Such an override is one error naming the grid values that win. A
    stage's ``trainer`` settings (a variant's ``stages``) win over ``trainer.*`` in the same way where every
    stage of the variant sets the key.
    ``only``: ``sweep --only``'s labels; grid values no selected point has do not count."""
    axes = {str(a): (list(v) if isinstance(v, ListConfig) else [v]) for a, v in (cfg.grid or {}).items()}

    def label(axis: str, value: Any) -> str:
        return str(point_label(axis, value))

    def live(axis: str, value: Any) -> bool:  # is it in a point `only` selects?
        if not only or label(axis, value) in only:
            return True
        return any(label(a, v) in only for a, vs in axes.items() if a != axis for v in vs)

    setters: dict[str, list[str]] = {}  # grid leaf -> where the grid sets it

    def sets(key: str, value: Any, where: str) -> None:
        for leaf in _grid_leaves(key, value):
            setters.setdefault(leaf, []).append(where)
        if key == "stages" and isinstance(value, ListConfig) and len(value):
            # a stage's trainer/data beat the top level's: a key every stage of the variant sets is lost
            # for its points (one only some stages set still reaches the others, as with the config's own)
            for leaf in _stage_leaves(value[0]):  # a key every stage sets, the first one among them
                if all(_stage_sets(stage, leaf) for stage in value):
                    names = ", ".join(str(_stage_name(stage)) for stage in value)
                    setters.setdefault(leaf, []).append(f"{where}, stage{'s' if len(value) > 1 else ''} {names}")

    for axis, values in axes.items():
        for i, value in enumerate(values):
            if not live(axis, value):
                continue
            if axis == "variant" and isinstance(value, DictConfig):
                where = f"grid.variant[{i}] ({label(axis, value)})"
                for k, v in value.items():
                    if k != "label":
                        sets(str(k), v, where)
            elif axis != "variant":
                sets(axis, value, f"grid.{axis}")
    if cfg.seeds:
        setters.setdefault("seed", []).append("seeds")
    # the config's own stages, unless every point replaces them (a `stages` axis; variants with stages)
    variants = [v for v in axes.get("variant", []) if live("variant", v)]
    replaced = "stages" in axes or (bool(variants) and all(isinstance(v, DictConfig) and "stages" in v
                                                           for v in variants))
    own = [] if replaced else list(enumerate(cfg.stages or []))
    given = any(item.split("=", 1)[0] == "stages" for item in overrides)

    for item in overrides:
        key = item.split("=", 1)[0]
        if key in ("grid", "seeds") or key.startswith("grid."):
            continue
        # the grid wins where it sets the same key or a mapping holding it (a variant's fusion: {name: ...})
        leaves = _override_leaves(key, OmegaConf.select(OmegaConf.from_dotlist([item]), key))
        hits = sorted({w for grid_leaf, where in setters.items() for w in where
                       if any(leaf == grid_leaf or leaf.startswith(grid_leaf + ".") for leaf in leaves)})
        if hits:
            shown = ", ".join(hits[:4]) + (f" and {len(hits) - 4} more" if len(hits) > 4 else "")
            fix = ("give the seeds as seeds=[...] instead" if key == "seed" else
                   "change it in the grid, leave those points out with `sweep --only`, or drop the grid "
                   "(grid={}) for a single point")
            raise FusionBenchError(f"override {key}: the grid sets it too ({shown}), and a grid value is applied "
                                   f"after the overrides, so yours would be replaced without effect; {fix}")
        if not own or not key.startswith(("trainer", "data")):
            continue
        for leaf in leaves:  # a stage's trainer/data win over the top-level ones
            setting = [(i, st) for i, st in own if _stage_sets(st, leaf)]
            named = ", ".join(f"stages[{i}] ({_stage_name(st)})" for i, st in setting)
            if setting and len(setting) == len(own):
                whose = "the stages given on the command line" if given else "the config's stages"
                fix = ", ".join(f"stages.{i}.{leaf}=..." for i, _ in setting)
                raise FusionBenchError(
                    f"override {leaf}: every stage sets it too ({whose}: {named}), and a stage's trainer/data win "
                    f"over the top-level ones, so yours would have no effect; set it per stage ({fix})"
                    + ("" if given else ", or replace the stages (stages=[...]; stages=[] trains one main stage)"))
            if setting:
                rest = ", ".join(str(_stage_name(st)) for i, st in own if i not in {j for j, _ in setting})
                print(f"[fusionbench] note: override {leaf} applies to stage(s) {rest} only; {named} set their own "
                      f"(stages.<i>.{leaf}=... sets one stage's)", file=sys.stderr, flush=True)


def _stage_name(stage: Any) -> Any:
    return stage.get("name") if isinstance(stage, DictConfig) else stage


def _stage_leaves(stage: Any) -> list[str]:
    """The dotted keys a stage's trainer/data set."""
    return [leaf for part in ("trainer", "data")
            if isinstance(stage, DictConfig) and isinstance(stage.get(part), DictConfig)
            for leaf in _grid_leaves(part, stage[part])]


def _stage_sets(stage: Any, leaf: str) -> bool:
    """Does a stage's trainer/data set the dotted ``leaf`` (or a mapping holding it)?"""
    return any(leaf == mine or leaf.startswith(mine + ".") for mine in _stage_leaves(stage))


def _merge_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    import yaml

    edited_stage = None
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "stages" and edited_stage:
            raise FusionBenchError(f"override stages=...: it replaces the stages, so the earlier {edited_stage!r} "
                                   "would be lost; give stages.<i>.<key>=... after stages=[...]")
        edited_stage = item if key.startswith("stages.") else edited_stage
        try:
            node = OmegaConf.from_dotlist([item]).get(key)
        except yaml.YAMLError as e:
            raise FusionBenchError(f"override {key}: the value {value!r} is not valid YAML ({first_line(e)})"
                                   + ("; in a {key: value} mapping YAML needs a space after each colon"
                                      if ":" in value else "")) from None
        _no_glued_colons(key, node, value)
        if key.startswith("stages."):
            cfg = _apply_to_stage(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([item]), key), item)
            continue
        cfg = _apply(cfg, key, node if key in ("fusion", "grid", "stages", "seeds") else None, item)
    return cfg


def _apply_to_stage(cfg: DictConfig, key: str, node: Any, item: str) -> DictConfig:
    """``stages.<i>.trainer.max_steps=300``: one setting of one of the config's stages (its keys and
    values are checked by :func:`finalise`, as the YAML's are)."""
    parts = key.split(".")
    stages = list(cfg.stages or [])
    shown = ", ".join(f"{i} ({_stage_name(s)})" for i, s in enumerate(stages)) or "none"
    if not parts[1].isdigit() or int(parts[1]) >= len(stages):
        variants = (cfg.grid or {}).get("variant") or []
        hint = ("; the grid's variants bring their own stages: change those in the grid"
                if any(isinstance(v, DictConfig) and "stages" in v for v in variants) or "stages" in (cfg.grid or {})
                else "")
        raise FusionBenchError(f"override {item!r}: stages.<i> takes a stage's index; this config's stages: "
                               f"{shown}{hint}")
    if len(parts) < 3 or parts[2] not in ("name", "trainer", "data"):
        raise FusionBenchError(f"override {item!r}: a stage has the keys name, trainer and data "
                               f"(e.g. stages.{parts[1]}.trainer.max_steps=...)")
    OmegaConf.update(cfg, key, node, merge=True)
    return cfg


def _no_glued_colons(key: str, node: Any, value: str) -> None:
    """``{name:mlp}`` is valid YAML for the key ``"name:mlp"`` with no value: never what was meant."""
    items = node.items() if isinstance(node, (dict, DictConfig)) else enumerate(node) if isinstance(node, (list, ListConfig)) else []
    for k, v in items:
        if isinstance(k, str) and ":" in k and v is None:
            raise FusionBenchError(f"override {key}: {value!r} has the key {k!r}; in a {{key: value}} mapping YAML "
                                   "needs a space after each colon")
        _no_glued_colons(key, v, value)


def _apply(cfg: DictConfig, key: str, node: Any, item: str | None = None) -> DictConfig:
    """Set ``key`` to ``node`` (or merge the dotlist ``item``) with fusionbench's override rules."""
    if key == "fusion" and (isinstance(node, str) or (isinstance(node, DictConfig) and "name" in node)):
        # `fusion=mlp` / `fusion={name: mlp, ...}` switches the strategy and drops the previous
        # strategy's options; a mapping without `name` edits the current strategy's options
        OmegaConf.set_struct(cfg, False)
        cfg.fusion = {"name": node} if isinstance(node, str) else node
        OmegaConf.set_struct(cfg, True)
        OmegaConf.set_struct(cfg.fusion, False)  # `fusion.<option>=...` may follow: finalise checks the options
    elif key in ("grid", "stages", "seeds"):  # collections: an override replaces them (`grid={}` clears)
        OmegaConf.update(cfg, key, node, merge=False)
    elif item is not None:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    else:
        patch = OmegaConf.create()
        OmegaConf.update(patch, key, node, force_add=True)
        cfg = OmegaConf.merge(cfg, patch)
    return cfg


def _explain(e: OmegaConfBaseException, path: Any) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = first_line(e)
    where = f" in {path}" if path else ""
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        options = _keys_at(parent)
        hint = did_you_mean(key.rsplit(".", 1)[-1], options, lambda c: repr((parent + "." if parent else "") + c))
        return f"unknown config key {key!r}{where}.{hint}"
    return f"invalid config value for {key!r}{where}: {msg}"


def _keys_at(dotted: str) -> list[str]:
    node: Any = _SCHEMA
    for part in filter(None, dotted.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return list(node.keys()) if isinstance(node, DictConfig) else []


def dataset_qtypes(cfg: DictConfig) -> tuple[str, ...]:
    """Every question type ``cfg.data``'s dataset declares (``QTYPES`` of its module; may be empty)."""
    import sys

    from fusionbench.data import DATASETS

    return tuple(getattr(sys.modules[DATASETS.get(cfg.data.name).__module__], "QTYPES", ()))


def study_qtypes(cfg: DictConfig) -> list[str]:
    """The question types a config's test split has: ``data.qtypes``, or every type of its dataset."""
    return list(cfg.data.qtypes) or list(dataset_qtypes(cfg))


def check_contrast_power(cfg: DictConfig, i: int, c: dict, counts: dict[str, int] | None = None) -> None:
    """A contrast on multiple-choice accuracy (``mm/choice/acc`` or ``mm/choice/<qtype>/acc``) with
    a stated ``mde`` needs enough test items of its question type to detect it (80% power, alpha
    0.05; :func:`fusionbench.stats.items_needed`); a contrast on a
    question type the data leaves out has none. Either is one error before any compute.
    ``counts``: the built test split's items per question type (checked again once it is built: a
    folder dataset's ``test_size`` is only a cap, and balancing drops items); None: from
    ``data.test_size``, the split's size when the config is read."""
    metric = str(c.get("metric", "mm/choice/acc"))
    parts = metric.split("/")
    if not (metric.startswith("mm/choice/") and metric.endswith("/acc") and len(parts) in (3, 4)):
        return
    try:
        known = dataset_qtypes(cfg)
        qtypes = list(cfg.data.qtypes) or list(known)
    except FusionBenchError:
        return  # an unknown dataset is reported by the data module, with the known names
    name = c.get("name") or f"{c['a']} - {c['b']}"
    items = int(cfg.data.test_size) if counts is None else sum(counts.values())
    if len(parts) == 4 and counts is not None:
        items = counts.get(parts[2], 0)
    elif len(parts) == 4:
        qtype = parts[2]
        if known and qtype not in known:
            raise FusionBenchError(f"contrasts[{i}] ({name}): metric {metric} names question type {qtype!r}; "
                                   f"{cfg.data.name} has {', '.join(known)}")
        if qtypes and qtype not in qtypes:
            raise FusionBenchError(f"contrasts[{i}] ({name}): metric {metric} needs {qtype} test items, but "
                                   f"data.qtypes={qtypes} leaves them out")
        items = items // max(1, len(qtypes))  # question types are balanced exactly
    if "mde" not in c:
        return
    from fusionbench.stats import DISCORDANCE, items_needed

    try:
        need = items_needed(float(c["mde"]), float(c.get("discordance", DISCORDANCE)))
    except (TypeError, ValueError) as e:
        raise FusionBenchError(f"contrasts[{i}] ({name}): {e}") from None
    if items < need:
        raise FusionBenchError(
            f"contrasts[{i}] ({name}): detecting a difference of {float(c['mde']):g} in {metric} with 80% power "
            f"needs >= {need} paired test items (discordance {float(c.get('discordance', DISCORDANCE)):g}; "
            f"fusionbench.stats.items_needed); " + (f"data.test_size={cfg.data.test_size} gives {items}" if counts is None
                                                    else f"the test split as built has {items}"))


def finalise(cfg: DictConfig, validate_fusion: bool = True) -> DictConfig:
    """Normalise shorthand and validate strategy options against the strategy's own schema."""
    OmegaConf.set_struct(cfg, False)
    if isinstance(cfg.fusion, str):
        cfg.fusion = {"name": cfg.fusion}
    if not isinstance(cfg.fusion, DictConfig) or "name" not in cfg.fusion:
        raise FusionBenchError("config key 'fusion' must be a strategy name or a mapping with 'name'")
    OmegaConf.set_struct(cfg, True)
    from fusionbench.plugins import load_plugins

    load_plugins(cfg.plugins)  # before anything is looked up in a registry
    if validate_fusion:
        from fusionbench.fusion import fusion_options
        cfg.fusion = fusion_options(cfg.fusion)
        for i, stage in enumerate(cfg.stages):
            if isinstance(stage, DictConfig) and "fusion" in stage:
                fusion_options(OmegaConf.merge(cfg.fusion, stage.fusion))
    if cfg.eval.text.backend not in ("suite", "lm_eval"):
        raise FusionBenchError(f"eval.text.backend must be 'suite' or 'lm_eval', got {cfg.eval.text.backend!r}")
    if cfg.eval.text.backend == "lm_eval" and cfg.eval.text.gen_tasks:
        raise FusionBenchError(f"eval.text.gen_tasks={list(cfg.eval.text.gen_tasks)} are scored by the built-in suite "
                               f"only; with eval.text.backend=lm_eval set eval.text.gen_tasks=[] (or use backend suite)")
    if cfg.eval.device != "auto":
        import torch

        try:
            torch.device(cfg.eval.device)
        except (RuntimeError, TypeError) as e:
            raise FusionBenchError(f"eval.device must be 'auto' or a torch device (cpu, cuda, cuda:1, mps), "
                                   f"got {cfg.eval.device!r}: {first_line(e)}") from None
    if cfg.vision.resize not in RESIZE_MODES:
        raise FusionBenchError(f"vision.resize must be one of {', '.join(RESIZE_MODES)}, got {cfg.vision.resize!r}")
    if cfg.data.images not in ("real", "shuffled", "blank"):
        raise FusionBenchError(f"data.images must be 'real', 'shuffled' or 'blank', got {cfg.data.images!r}")
    for i, c in enumerate(cfg.contrasts):
        c = OmegaConf.to_container(c) if OmegaConf.is_config(c) else c
        if not isinstance(c, dict) or not {"a", "b"} <= set(c) or set(c) - {"name", "a", "b", "metric", "expect", "mde",
                                                                             "discordance", "a_table", "b_table"}:
            raise FusionBenchError(f"contrasts[{i}] must be a mapping with a, b and optionally name, metric, "
                                   f"expect (greater|less), mde, discordance, a_table, b_table, got {c!r}")
        if c.get("a_table") and c.get("b_table"):
            raise FusionBenchError(f"contrasts[{i}]: at most one side may come from another results table")
        if c.get("expect", "greater") not in ("greater", "less"):
            raise FusionBenchError(f"contrasts[{i}].expect must be 'greater' or 'less', got {c['expect']!r}")
        check_contrast_power(cfg, i, c)
    from fusionbench.evaluation import EVALUATORS

    for name in cfg.eval.metrics:
        EVALUATORS.get(name)  # unknown name: one clear error naming the known ones
    if cfg.trainer.logger not in LOGGERS:
        raise FusionBenchError(f"trainer.logger must be one of {', '.join(LOGGERS)}, got {cfg.trainer.logger!r}")
    import importlib.util

    needs = LOGGERS[cfg.trainer.logger]
    if needs and not any(importlib.util.find_spec(p) for p in needs):
        raise FusionBenchError(f"trainer.logger={cfg.trainer.logger} needs the package {needs[0]!r}, which is not "
                               f"installed (pip install {needs[0]}); or use trainer.logger=csv")
    if cfg.trainer.optimizer_impl not in ("fused", "foreach"):
        raise FusionBenchError(f"trainer.optimizer_impl must be 'fused' or 'foreach', got {cfg.trainer.optimizer_impl!r}")
    check_ranges(cfg.trainer, cfg.data, cfg.vision, cfg.eval)
    for i, stage in enumerate(cfg.stages):
        if isinstance(stage, DictConfig) and ("trainer" in stage or "data" in stage):
            for part in ("trainer", "data"):
                if stage.get(part) is not None and not isinstance(stage.get(part), DictConfig):
                    raise FusionBenchError(f"stages[{i}] ({_stage_name(stage)}).{part} must be a mapping of "
                                           f"{part} keys (e.g. {{{'max_steps: 300' if part == 'trainer' else 'train_size: 6000'}}}), "
                                           f"got {stage.get(part)!r}")
            try:
                trainer = OmegaConf.merge(cfg.trainer, stage.get("trainer") or {})
                data = OmegaConf.merge(cfg.data, stage.get("data") or {})
            except OmegaConfBaseException as e:  # as runner.stage_plan words it
                raise FusionBenchError(_explain(e, f"stages[{i}] ({_stage_name(stage)})")) from None
            check_ranges(trainer, data, where=f"stages[{i}] ")
    return cfg


#: (key, lowest allowed, what it means) of every integer option with a range
_INT_RANGES = [
    ("trainer.max_steps", 1, "optimizer steps"), ("trainer.batch_size", 1, "examples per step"),
    ("trainer.warmup_steps", 0, "linear warm-up steps"), ("trainer.num_nodes", 1, "machines"),
    ("trainer.num_workers", 0, "data loader workers"), ("trainer.log_every_n_steps", 1, "steps"),
    ("trainer.max_length", 8, "tokens"), ("trainer.checkpoint_every_n_steps", 0, "steps, 0: only at the end"),
    ("trainer.val_every_n_steps", 0, "steps, 0: once at the end"), ("trainer.limit_val_batches", 0, "batches"),
    ("data.train_size", 1, "examples"), ("data.val_size", 0, "examples"), ("data.test_size", 0, "examples"),
    ("data.image_size", 8, "pixels"), ("vision.image_size", 8, "pixels"), ("vision.pool_tokens", 0, "tokens, 0: all"),
    ("eval.mm_items", 0, "test items, 0: off"), ("eval.max_new_tokens", 1, "tokens"), ("eval.batch_size", 1, "examples"),
    ("eval.val_items", 0, "val items, 0: off"), ("eval.efficiency_items", 1, "examples"),
    ("eval.probe_train", 2, "examples"), ("eval.probe_test", 2, "examples"), ("eval.caption_items", 1, "items"),
    ("eval.caption_max_new_tokens", 1, "tokens"), ("eval.curve_every_n_steps", 0, "steps, 0: off"),
    ("eval.curve_items_per_task", 1, "items"), ("eval.curve_prose_chunks", 0, "chunks"),
    ("eval.text.n_per_task", 1, "items"), ("eval.text.ppl_chunks", 0, "chunks, 0: off"),
    ("eval.text.ppl_chunk_tokens", 2, "tokens"), ("eval.text.gen_items", 1, "items"),
    ("eval.text.gen_max_new_tokens", 1, "tokens"),
]


def check_ranges(trainer: Any, data: Any, vision: Any = None, ev: Any = None, where: str = "") -> None:
    """Every number checked before any compute: one line naming the key, the value and the range."""
    import math

    nodes = {"trainer": trainer, "data": data, "vision": vision, "eval": ev}
    for key, low, what in _INT_RANGES:
        node = nodes[key.split(".")[0]]
        if node is None:
            continue
        value = OmegaConf.select(node, key.split(".", 1)[1])
        if value is not None and value < low:
            if key == "trainer.max_steps" and trainer.flops_budget > 0:
                continue  # replaced by the steps that fit the FLOP budget
            raise FusionBenchError(f"{where}{key}={value} is out of range: it must be >= {low} ({what})")
    for key, value, ok, rule in [
        ("trainer.lr", trainer.lr, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("trainer.weight_decay", trainer.weight_decay, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        ("trainer.grad_clip", trainer.grad_clip, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: off)"),
        ("trainer.flops_budget", trainer.flops_budget, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: off)"),
    ]:
        if not ok(float(value)):
            raise FusionBenchError(f"{where}{key}={value} is out of range: it must be {rule}")
    if trainer.flops_budget <= 0 and trainer.warmup_steps > trainer.max_steps:
        raise FusionBenchError(f"{where}trainer.warmup_steps={trainer.warmup_steps} is more than trainer.max_steps="
                               f"{trainer.max_steps}: the learning rate would never reach trainer.lr")
    devices = trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
            or (isinstance(devices, str) and devices.lstrip("-").isdigit() and (int(devices) >= 1 or int(devices) == -1))
            or (isinstance(devices, (list, ListConfig)) and len(devices) and all(isinstance(d, int) and d >= 0 for d in devices))):
        raise FusionBenchError(f"{where}trainer.devices={devices!r} is not a device count: it must be an integer >= 1, "
                               "-1 (all), 'auto' or a list of device indices")
    if data.train_size < trainer.batch_size:
        raise FusionBenchError(f"{where}data.train_size={data.train_size} is smaller than trainer.batch_size="
                               f"{trainer.batch_size}: no full batch to train on (the last partial batch is dropped)")


def grid_points(cfg: DictConfig) -> list[tuple[dict[str, Any], DictConfig]]:
    """The cartesian product of ``cfg.grid`` (and of ``cfg.seeds``, innermost) as ``(label, config)``
    pairs: ``label`` names the grid values of the point (not its seed); each config fully validated."""
    if not cfg.grid and not cfg.seeds:
        return [({}, cfg)]
    keys = list(cfg.grid.keys())
    values = [list(v) if isinstance(v, (ListConfig, list)) else [v] for v in cfg.grid.values()]
    if "variant" in cfg.grid:
        for i, v in enumerate(values[keys.index("variant")]):
            if not isinstance(v, DictConfig) or not len(v):
                raise FusionBenchError(f"grid.variant[{i}] must be a mapping {{dotted.key: value, ...}}, got {v!r}")
    if cfg.seeds:
        if "seed" in keys:
            raise FusionBenchError("give seeds either as 'seeds: [...]' or as 'grid: {seed: [...]}', not both")
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise FusionBenchError(f"seeds {list(cfg.seeds)} has duplicates")
        keys.append("seed")
        values.append(list(cfg.seeds))
    points = []
    for combo in itertools.product(*values):
        base = copy.deepcopy(cfg)
        OmegaConf.set_struct(base, False)
        base.grid = {}
        base.seeds = []
        OmegaConf.set_struct(base, True)
        label: dict[str, Any] = {}
        grid_set: list[tuple[str, str]] = []  # (leaf, where) the point's grid values set
        try:
            for key, value in zip(keys, combo):
                if key == "variant":
                    bundle = OmegaConf.to_container(value)
                    bundle.pop("label", None)
                    for k, v in bundle.items():
                        base = _apply(base, k, OmegaConf.create({"v": v}).v)
                        grid_set += [(leaf, f"grid.variant ({point_label(key, value)})")
                                     for leaf in _grid_leaves(k, OmegaConf.create({"v": v}).v)]
                    label["variant"] = point_label(key, value)
                    continue
                grid_set += [(leaf, f"grid.{key}") for leaf in _grid_leaves(key, value)]
                plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
                base = _apply(base, key, OmegaConf.create({"v": plain}).v if key in ("fusion", "stages") else None,
                              f"{key}={OmegaConf.to_yaml(value).strip() if isinstance(value, (DictConfig, ListConfig)) else value}"
                              if key not in ("fusion", "stages") else None)
                if key != "seed":
                    label[key] = point_label(key, value)
        except OmegaConfBaseException as e:
            raise FusionBenchError(_explain(e, "grid")) from None
        stages = list(base.stages or [])
        for leaf, where in grid_set:
            if stages and leaf.startswith(("trainer.", "data.")) and all(_stage_sets(st, leaf) for st in stages):
                raise FusionBenchError(f"{where} sets {leaf}, but every stage of that point sets its own "
                                       f"({', '.join(str(_stage_name(st)) for st in stages)}), so the grid value "
                                       f"has no effect; set it in the stages")
        points.append((label, finalise(base)))
    return points


def point_label(axis: str, value: Any) -> Any:
    """How a grid value labels its points (``sweep --only`` matches its ``str``): a variant's
    ``label`` or a short name for it, an axis value as plain data."""
    plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    if axis == "variant" and isinstance(plain, dict):
        return plain.pop("label", None) or _short(plain)
    return plain


def _short(bundle: dict[str, Any]) -> str:
    fusion = bundle.get("fusion")
    if isinstance(fusion, str):
        return fusion
    if isinstance(fusion, dict) and "name" in fusion:
        return str(fusion["name"])
    return json.dumps(bundle, sort_keys=True)


def expand_grid(cfg: DictConfig) -> list[DictConfig]:
    """The grid's points as validated configs (see :func:`grid_points`)."""
    return [point for _, point in grid_points(cfg)]


#: keys added to the schema after results were committed, with their defaults: at the default they
#: are left out of the config hash, so older rows keep their hashes (a sweep still finds them finished).
#: Each is how something is computed, not what: the same math (``trainer.optimizer_impl``: fused
#: vs foreach AdamW; ``trainer.cache_text_prefix``: a shared prompt prefix's KV computed once),
#: last-bit rounding apart, like the thread count or the attention kernel.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {"vision.feature_cache": True, "trainer.compile": False, "trainer.num_nodes": 1,
                                          "trainer.logger": "csv",
                                          "trainer.optimizer_impl": "fused", "trainer.cache_text_prefix": True,
                                          "eval.val_controls": False, "plugins": [],
                                          "vision.resize": "stretch", "eval.device": "auto"}


def config_hash(cfg: DictConfig, drop: tuple[str, ...] = ()) -> str:
    """Stable hash of everything that determines a run's numbers (not where it writes)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for dotted, default in HASH_NEUTRAL_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(leaf, object()) == default:
            node.pop(leaf)
    for key in ("output_dir", "results_file", "grid", "seeds", "contrasts"):
        data.pop(key, None)
    for key in drop:
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
