"""``fusionbench run``: assets -> model -> train (one or more stages) -> evaluate -> results rows."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import warnings

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fusionbench.assets.paths import cache_dir
from fusionbench.config import config_hash, grid_points
from fusionbench.errors import FusionBenchError, first_line
from fusionbench.model import VisionLanguageModel, on_device, scoring_mode
from fusionbench.results import (append_row, check_writable, code_hash, cpu_has_native_bf16, cpu_identity, device_label,
                                 git_sha, provenance)
from fusionbench.training import FusionDataModule, FusionModule


def log(msg: str) -> None:
    print(f"[fusionbench] {msg}", file=sys.stderr, flush=True)


def lm_identity(cfg: DictConfig) -> str:
    if cfg.lm.source == "tiny":
        return "tiny-" + json.dumps(OmegaConf.to_container(cfg.lm.tiny), sort_keys=True) + f"-seed{cfg.seed}"
    return f"{cfg.lm.source}-{cfg.lm.dtype}"


def text_model_fn(forward):
    def fn(input_ids, attention_mask):
        return forward(input_ids, attention_mask)
    return fn


class Prepared:
    """Everything a run needs, built and validated before any training compute."""

    def __init__(self, cfg: DictConfig, text_suite: bool = True, evaluate: bool = True):
        from fusionbench.assets.lm import load_lm
        from fusionbench.assets.vision import load_vision

        self.cfg = cfg
        # where evaluation and the forgetting curve compute (checked before any asset loads)
        self.eval_device = eval_device(cfg)
        self.train_device = run_training_device(cfg)  # every stage's (one device; the curve scores there)
        log(f"preparing {cfg.name}: fusion={cfg.fusion.name} lm={cfg.lm.source} vision={cfg.vision.source} "
            f"data={cfg.data.name} seed={cfg.seed}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.vision = load_vision(cfg.vision, seed=cfg.seed)
        self.lm, self.tokenizer = load_lm(cfg.lm, seed=cfg.seed)
        self.text_eval = text_suite
        self.suite = None
        lm_eval_backend = cfg.eval.text.backend == "lm_eval"
        if text_suite and (not lm_eval_backend or cfg.eval.curve_every_n_steps > 0):
            from fusionbench.evaluation.text_suite import load_text_suite
            self.suite = load_text_suite(cfg.eval.text)
        # the bare LM, before fusion, on the device the trained model is scored on
        self.base_text = self._base_text_scores(self.suite, device=self.eval_device) if text_suite else {}
        # the bare base LM kept beside the model: token KL(base || trained) on the prose needs both
        # distributions (frozen-text strategies measure exactly 0, the others what they moved)
        self.reference = None
        if self.suite is not None and self.suite.prose:
            import copy

            self.reference = copy.deepcopy(self.lm).eval().requires_grad_(False)
        self.curve_suite, self.curve_base = None, {}
        if self.suite is not None and cfg.eval.curve_every_n_steps > 0:
            e = cfg.eval
            self.curve_suite = self.suite.subset(e.curve_items_per_task, e.curve_prose_chunks)
            self.curve_base = self._base_text_scores(self.curve_suite, f"curve{e.curve_items_per_task}-{e.curve_prose_chunks}",
                                                     device=self.train_device)  # the curve scores during training
        context = lm_context_length(self.lm)
        if context and cfg.trainer.max_length > context:
            raise FusionBenchError(f"trainer.max_length={cfg.trainer.max_length} is longer than the LM's context "
                                   f"({context} positions, lm.source={cfg.lm.source}): lower trainer.max_length")
        self.model = VisionLanguageModel.from_config(cfg, backbones=(self.vision, self.lm, self.tokenizer))
        self.data = FusionDataModule(cfg.data, cfg.trainer, self.tokenizer, self.vision.preprocess,
                                     self.model.num_image_tokens, seed=cfg.seed)
        self.data.setup("fit")
        if cfg.eval.captions and "caption" not in self.data.val_ds.column_names:
            raise FusionBenchError(f"eval.captions needs captions; dataset {cfg.data.name!r} has none")
        if evaluate and "choice" in cfg.eval.metrics and cfg.eval.choice:
            # the test split is built (and checked) before any training compute; a dataset of
            # captions only has nothing to choice-score
            short = self.data.short_test
            if len(short) == 1:
                raise FusionBenchError("choice scoring needs at least 2 test items, data.test_size gives 1")
            if len(short):
                from collections import Counter

                from fusionbench.config import check_contrast_power
                from fusionbench.evaluation.choice import item_choices

                item_choices(short)
                counts = Counter(short["qtype"])  # the contrasts' power on the items there are
                for i, c in enumerate(cfg.contrasts or []):
                    check_contrast_power(cfg, i, OmegaConf.to_container(c) if OmegaConf.is_config(c) else c, dict(counts))
        # the depth probes' floor: the same strategy, same seed, before any training (a random
        # connector already passes image information on); measured here, before the weights move
        self.untrained_probes: dict[str, float] = {}
        if evaluate and cfg.eval.probes and "probes" in cfg.eval.metrics:
            from fusionbench.evaluation.probes import depth_probes

            log("depth probes of the untrained model (the probes' floor) ...")
            with torch.random.fork_rng(), on_device(self.model, device=self.eval_device):  # where the trained ones run
                self.untrained_probes = depth_probes(self.model, n_train=cfg.eval.probe_train,
                                                     n_test=cfg.eval.probe_test, seed=cfg.seed)

    def _base_text_scores(self, suite, part: str = "full", device=None) -> dict[str, float]:
        backend = text_backend(self.cfg, part)
        device = device or torch.device("cpu")
        key = base_text_key(self.cfg, device, part)
        path = cache_dir("text_base") / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        import fcntl

        # sweeps started side by side (one per strategy on a GPU machine) score the base once: the
        # first takes the lock, the others wait for its file instead of each scoring the same LM
        with open(path.with_name(f".{path.stem}.lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("another process is scoring the base LM on the text suite; waiting for its scores ...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                return json.loads(path.read_text())
            log(f"scoring the base LM on the text suite ({backend}; cached per LM and suite) ...")
            with on_device(self.lm, device=device):
                scores = text_scores(self.cfg, self.lm, self.tokenizer, suite, backend=backend)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(scores))
            os.replace(tmp, path)
        return scores


def text_backend(cfg: DictConfig, part: str = "full") -> str:
    """The backend that scores the base LM's ``part``: the full suite's configured one, the forgetting
    curve's own suite always."""
    return cfg.eval.text.backend if part == "full" else "suite"


def base_text_key(cfg: DictConfig, device: torch.device, part: str = "full") -> str:
    """The cache key of the base LM's text-suite scores: the LM, the suite and its version, and what
    changes float reductions (threads, device; on the CPU its instruction set and family/model, off it
    the accelerator type, CUDA and torch versions), since exact-zero forgetting needs the base scored
    by the same kernels as the trained model. Plain strings only (``torch.__version__`` is a
    ``TorchVersion``, which omegaconf refuses)."""
    from fusionbench.evaluation.text_suite import SUITE_VERSION

    version = SUITE_VERSION
    if text_backend(cfg, part) == "lm_eval":
        import lm_eval

        from fusionbench.evaluation.lm_eval_adapter import LM_EVAL_SUITE_VERSION
        version = f"{LM_EVAL_SUITE_VERSION}-lm_eval{lm_eval.__version__}"
    # a CPU's name does not fix its kernels: two "AMD EPYC" machines scored the base LM differently, and
    # a cache that outlives its machine (a persistent home) must not hand one's scores to the other
    on = cpu_identity() if device.type == "cpu" else {"on": str(device.type), "cuda": str(torch.version.cuda),
                                                      "torch": str(torch.__version__)}
    return config_hash(OmegaConf.create({"lm": lm_identity(cfg), "version": version,
                                         "threads": torch.get_num_threads(), "device": device_label(device), **on,
                                         "batch_size": cfg.eval.batch_size, "part": part,
                                         "suite": OmegaConf.to_container(cfg.eval.text)}))


_TRAINING_DEVICES: dict[str, torch.device | None] = {}


def training_device(tcfg: DictConfig) -> torch.device | None:
    """Rank 0's device for these ``trainer.*`` settings as Lightning resolves them on this machine
    (a throwaway ``Trainer``, no model), or None where Lightning refuses them here (a GPU config on
    a machine without one)."""
    kw = hardware_kwargs(tcfg)
    key = json.dumps(kw, sort_keys=True, default=str)
    if key not in _TRAINING_DEVICES:
        with _lightning_info_quiet():  # a refusal is check_hardware's to report, where it matters
            trainer = _throwaway_trainer(kw, quiet=True)
        _TRAINING_DEVICES[key] = None if isinstance(trainer, Exception) else trainer.strategy.root_device
    return _TRAINING_DEVICES[key]


def run_training_device(cfg: DictConfig) -> torch.device:
    """Where ``cfg``'s stages train (each stage's ``trainer.*`` over the top-level ones; the CPU
    where Lightning refuses them here). One device for the whole run: the forgetting curve during
    every stage and the final scores compare against the base LM scored once, on one device's
    kernels, so stages that would train on different devices are one clear error before any compute."""
    where = {stage.name: training_device(stage.trainer) or torch.device("cpu") for stage in stage_plan(cfg)}
    if len(set(where.values())) > 1:
        named = ", ".join(f"{name}: {device}" for name, device in where.items())
        raise FusionBenchError(f"the stages would train on different devices ({named}); the forgetting curve and "
                               "the evaluation score against the base LM on one device: give every stage the same "
                               "trainer.accelerator / trainer.devices (set them at the top level)")
    return next(iter(where.values()))


def eval_device(cfg: DictConfig) -> torch.device:
    """Where ``cfg``'s evaluation runs (``eval.device``; ``auto``: where its stages train,
    :func:`run_training_device`). A device this machine does not have is one clear error, before
    any compute."""
    if cfg.eval.device == "auto":
        return run_training_device(cfg)
    device = torch.device(cfg.eval.device)
    if device.type == "meta":
        raise FusionBenchError("eval.device=meta: a meta tensor has no values to evaluate; use eval.device=auto or cpu")
    if device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / AssertionError by backend
            raise FusionBenchError(f"eval.device={cfg.eval.device}: this machine has no such device "
                                   f"({first_line(e)}); use eval.device=auto or cpu") from None
    return device


def text_scores(cfg: DictConfig, model, tokenizer, suite=None, backend: str | None = None,
                reference=None) -> dict[str, float]:
    """Text-only scores of a bare HF LM (the base) or of a VisionLanguageModel's text-only path,
    by the configured backend; base and trained model go through the same computation."""
    t = cfg.eval.text
    bare = not isinstance(model, VisionLanguageModel)
    if (backend or t.backend) == "lm_eval":
        from fusionbench.evaluation.lm_eval_adapter import score_with_lm_eval

        tok = tokenizer if bare else None
        scores = score_with_lm_eval(model, tok, list(t.tasks), limit=t.n_per_task, batch_size=cfg.eval.batch_size,
                                    seed=t.seed) if t.tasks else {}
        if t.ppl_chunks:
            scores.update(score_with_lm_eval(model, tok, ["austen"], limit=t.ppl_chunks,
                                             batch_size=cfg.eval.batch_size, seed=t.seed))
        return scores
    from fusionbench.evaluation.text_suite import score_text_suite

    return score_text_suite(suite, model, tokenizer, batch_size=cfg.eval.batch_size, reference=reference)


def hardware_kwargs(tcfg: DictConfig) -> dict[str, Any]:
    """The ``trainer.*`` settings handed to ``lightning.Trainer`` as they are: where and how it runs."""
    devices = OmegaConf.to_container(tcfg.devices) if OmegaConf.is_config(tcfg.devices) else tcfg.devices
    return {"accelerator": tcfg.accelerator, "devices": devices, "num_nodes": tcfg.num_nodes,
            "strategy": tcfg.strategy, "precision": tcfg.precision}


_HARDWARE_CHECKED: set[str] = set()


@contextlib.contextmanager
def _lightning_info_quiet():
    """Lightning's info lines ("GPU available: ...") held back: they come again when the real Trainer starts."""
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_hardware(tcfg: DictConfig, where: str = "") -> None:
    """Lightning's own check of accelerator / devices / strategy / precision (a throwaway
    ``Trainer`` built with them, no model): a mistyped strategy, an unknown precision or a GPU
    accelerator on a machine without one is one error before any asset loads, not a traceback after."""
    kw = hardware_kwargs(tcfg)
    key = json.dumps(kw, sort_keys=True, default=str)
    if key in _HARDWARE_CHECKED:
        return
    with _lightning_info_quiet():
        error = _trainer_refuses(kw)
        if error is not None:
            raise FusionBenchError(f"{where}Lightning does not accept {_hardware_culprits(kw)}: {first_line(error)}")
    _HARDWARE_CHECKED.add(key)


def _warn_slow_cpu_bf16(trainer: L.Trainer, tcfg: DictConfig) -> None:
    """bf16 autocast on a CPU without native bf16 (no AVX512-BF16 / AMX): oneDNN emulates it, and a
    matmul runs tens of times slower than in float32 (70x measured with ONEDNN_MAX_CPU_ISA=AVX2). Said
    once per stage, not refused: the config asked for it (experiments/main_gpu.yaml on a CPU, say)."""
    if "bf16" not in str(tcfg.precision) or not isinstance(trainer.accelerator, L.pytorch.accelerators.CPUAccelerator):
        return
    if not cpu_has_native_bf16():
        log(f"warning: trainer.precision={tcfg.precision} on a CPU without native bf16 (no AVX512-BF16 or AMX): "
            "it is emulated, many times slower than trainer.precision=32-true")


def _throwaway_trainer(kw: dict[str, Any], quiet: bool = False) -> L.Trainer | Exception:
    """A ``Trainer`` with these settings and no model, or Lightning's objection to them (``quiet``:
    without the warnings a probe with settings the user never gave would print)."""
    import warnings

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        try:
            return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, **kw)
        except Exception as e:  # noqa: BLE001 - Lightning raises ValueError, MisconfigurationException, RuntimeError
            return e


def _trainer_refuses(kw: dict[str, Any], quiet: bool = False) -> Exception | None:
    """Lightning's objection to a ``Trainer`` with these settings, or None."""
    trainer = _throwaway_trainer(kw, quiet)
    return trainer if isinstance(trainer, Exception) else None


def _hardware_culprits(kw: dict[str, Any]) -> str:
    """The settings to name for a refused ``kw`` (Lightning's message does not say which): those
    whose return to the default makes the rest accepted; else those refused on their own (the
    others at their defaults); else every changed one."""
    from fusionbench.config import TrainConfig

    defaults = hardware_kwargs(OmegaConf.structured(TrainConfig))
    changed = [k for k in kw if kw[k] != defaults[k]] or list(kw)
    without = [k for k in changed if _trainer_refuses({**kw, k: defaults[k]}, quiet=True) is None]
    if without:
        return " with ".join(f"trainer.{k}={kw[k]}" for k in without)
    alone = [k for k in changed if _trainer_refuses({**defaults, k: kw[k]}, quiet=True) is not None]
    return " and ".join(f"trainer.{k}={kw[k]}" for k in alone or changed)


def check_plan_hardware(cfg: DictConfig, plan: list[DictConfig]) -> None:
    """:func:`check_hardware` of every stage of a point about to train (not of ``eval`` or a dry
    run: they build no Trainer, so a GPU run's config is fine to evaluate or list on a CPU machine)."""
    for i, stage in enumerate(plan):
        check_hardware(stage.trainer, f"stages[{i}] ({stage.name}): " if cfg.stages else "")


def stage_plan(cfg: DictConfig) -> list[DictConfig]:
    """Stages as full configs ``[{name, trainer, data}]`` (each stage's ``trainer`` / ``data``
    merged over the top-level ones); one ``main`` stage when none are given. What trains in a stage
    is the strategy's choice for that stage name (``FusionStrategy.trainable``)."""
    from omegaconf.errors import OmegaConfBaseException

    from fusionbench.config import _explain
    from fusionbench.fusion import FUSIONS

    if not cfg.stages:
        return [OmegaConf.create({"name": "main", "trainer": cfg.trainer, "data": cfg.data})]
    known = FUSIONS.get(cfg.fusion.name).stage_names
    plan = []
    for i, stage in enumerate(cfg.stages):
        if not isinstance(stage, DictConfig) or stage.get("name") not in known:
            name = stage.get("name") if isinstance(stage, DictConfig) else stage
            raise FusionBenchError(f"stages[{i}].name {name!r} is not a stage of strategy "
                                   f"{cfg.fusion.name!r}; its stages: {', '.join(known)}")
        unknown = set(stage.keys()) - {"name", "trainer", "data"}
        if unknown:
            raise FusionBenchError(f"stages[{i}] has unknown keys {sorted(unknown)} (allowed: name, trainer, data)")
        try:
            train = OmegaConf.merge(cfg.trainer, stage.get("trainer", {}))
            data = OmegaConf.merge(cfg.data, stage.get("data", {}))
        except OmegaConfBaseException as e:
            raise FusionBenchError(_explain(e, f"stages[{i}] ({stage.name})")) from None
        plan.append(OmegaConf.create({"name": stage.name, "trainer": train, "data": data}))
    return plan


# frozen backbones are kept in eval mode on purpose (FusionModule.train keeps them so)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# a resumed stage's earlier metrics.csv has moved aside (make_logger): nothing of it is deleted
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def compile_decoder_layers(model: VisionLanguageModel, **compile_kwargs) -> int:
    """Regional ``torch.compile``: each decoder block of the LM (with whatever a strategy injected
    into it) is compiled in place; identical blocks share one compiled graph, so the cold start is
    one block's, not the whole model's. Returns how many blocks.

    Training then runs without the shared prompt prefix's KV cache (``trainer.cache_text_prefix``):
    each block's cache update is guarded on its own layer index, so every block recompiled, and past
    dynamo's limit of 8 the rest ran eagerly (seen on an H200: 22 of SmolLM2's 30 blocks). The
    prefix's few tokens are cheap beside that; the loss is the same up to float rounding."""
    from fusionbench.fusion._lm import decoder_layers

    _, layers = decoder_layers(model.lm)
    fresh = [layer for layer in layers if not getattr(layer, "_compiled_call_impl", None)]
    if fresh:
        # a new model (the next point of a sweep): dynamo's recompile limit counts per code object,
        # shared by every model of the process, so earlier points' graphs would use it up
        torch._dynamo.reset()
    for layer in fresh:
        layer.compile(**compile_kwargs)
    model.cache_text_prefix = False
    return len(layers)


def make_logger(kind: str, run_dir: Path, stage: str):
    """The Lightning logger ``trainer.logger`` names, writing under the run directory. A stage
    resumed from its checkpoint keeps the log of each earlier session: Lightning's CSV logger
    deletes an existing ``metrics.csv`` when it starts, so that file first moves aside to
    ``metrics.1.csv`` (``.2``, ... for later resumes; the highest number is the latest earlier
    session, ``metrics.csv`` the current one). An earlier file runs past the checkpoint the next
    session resumed from: its steps after that checkpoint were trained again, so joining the files
    keeps, for each step, the later file's row. Only the first process of a distributed run moves it."""
    loggers = L.pytorch.loggers
    try:
        if kind == "csv":
            from lightning.pytorch.utilities import rank_zero_only

            log_dir = run_dir / "logs" / stage
            if rank_zero_only.rank == 0 and (log_dir / "metrics.csv").is_file():
                done = [int(m.group(1)) for p in log_dir.glob("metrics.*.csv")
                        if (m := re.fullmatch(r"metrics\.([0-9]+)\.csv", p.name))]
                (log_dir / "metrics.csv").rename(log_dir / f"metrics.{1 + max(done, default=0)}.csv")
            return loggers.CSVLogger(run_dir, name="logs", version=stage)
        if kind == "tensorboard":
            return loggers.TensorBoardLogger(run_dir, name="tb", version=stage)
        if kind == "mlflow":
            return loggers.MLFlowLogger(experiment_name=run_dir.parent.name, run_name=f"{run_dir.name}-{stage}",
                                        tracking_uri=f"file:{(run_dir / 'mlruns').resolve()}")
        if kind == "wandb":
            return loggers.WandbLogger(name=f"{run_dir.name}-{stage}", save_dir=str(run_dir), offline=True)
    except (ImportError, ModuleNotFoundError) as e:
        raise FusionBenchError(f"trainer.logger={kind} needs its package ({e}); install it or use trainer.logger=csv") from None
    raise FusionBenchError(f"unknown trainer.logger {kind!r}")


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name / f"{cfg.fusion.name}-{config_hash(cfg)}-s{cfg.seed}"


def lm_context_length(lm) -> int | None:
    """Positions the LM was built for (Llama / Qwen2 / Gemma ``max_position_embeddings``, GPT-2
    ``n_positions``); None when its config does not say."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stage_checkpoint(run_dir: str | Path, stage: str) -> Path:
    """Where a stage's newest Lightning checkpoint lives: ``run_dir/checkpoints/<stage>/last.ckpt``
    (training writes it; a resumed point, ``fusionbench eval`` and ``sweep --dry-run`` read it)."""
    return Path(run_dir) / "checkpoints" / stage / "last.ckpt"


def stage_record(run_dir: str | Path, stage: str) -> Path:
    """The stage's training record beside its checkpoint (``trained.json``: steps taken, training
    seconds over every session, final train loss, the validation and forgetting curves): written
    when the stage finishes training, read when a point whose evaluation was cut short is restarted,
    so its row still says how it trained."""
    return stage_checkpoint(run_dir, stage).with_name("trained.json")


def read_stage_record(run_dir: str | Path, stage: str, steps: int) -> dict[str, Any]:
    """The stage's training record (:func:`stage_record`) when it belongs to the checkpoint of
    ``steps`` steps, else {} (none written: older code, or a stage still training)."""
    path = stage_record(run_dir, stage)
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return record if record.get("steps") == steps else {}


def _checkpoint_header(path: Path) -> dict[str, Any] | None:
    """A Lightning checkpoint's dict, memory-mapped (None: none there or unreadable, e.g. cut short by
    a kill while writing)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a half-written file from a kill
        return None


def checkpoint_step(path: Path) -> int | None:
    """The global step a Lightning checkpoint was saved at (None: none there or unreadable, e.g.
    cut short by a kill while writing)."""
    header = _checkpoint_header(path)
    if header is None or "global_step" not in header:
        if path.exists():  # unreadable: start the stage again
            log(f"ignoring unreadable checkpoint {path}")
        return None
    return int(header["global_step"])


#: set to 1 to continue from (or evaluate) a checkpoint that other code trained (see check_checkpoint_code)
RESUME_OTHER_CODE = "FUSIONBENCH_RESUME_OTHER_CODE"


def checkpoint_target(path: Path, stage: DictConfig) -> int | None:
    """The steps the stage of this checkpoint trains for: recorded in the checkpoint (a
    compute-matched stage's follow from its FLOPs budget), else ``trainer.max_steps``. A
    compute-matched checkpoint of older code did not record them: its own step when the stage's
    training record (written when it finished) belongs to it, else None (unknown)."""
    header = _checkpoint_header(path)
    if header is not None and "fusionbench_max_steps" in header:
        return int(header["fusionbench_max_steps"])
    if stage.trainer.flops_budget <= 0:
        return int(stage.trainer.max_steps)
    step = None if header is None else header.get("global_step")
    finished = step is not None and read_stage_record(path.parents[2], stage.name, int(step))  # path: run_dir/checkpoints/<stage>/last.ckpt
    return int(step) if finished else None


def checkpoint_code(path: Path) -> str | None:
    """The ``code_hash`` of the code that saved a stage checkpoint (None: none there, unreadable, or
    saved by a fusionbench older than this record)."""
    header = _checkpoint_header(path)
    return None if header is None else header.get("fusionbench_code_hash")


def check_checkpoint_code(cfg: DictConfig, stages: list[DictConfig], done_stages) -> dict[str, str]:
    """Before any compute: a stage checkpoint in the run directory that other code trained (its
    recorded ``code_hash`` differs from this code's) is not continued from or evaluated silently,
    since after an edit to a strategy its weights are not what this code would train. One error
    saying what to do, unless ``FUSIONBENCH_RESUME_OTHER_CODE=1`` (then the rows record the
    checkpoint's code as ``trained_code_hash``). Returns stage -> that other code hash."""
    other = {}
    for stage in stages:
        if stage.name in done_stages or not stage.trainer.checkpoint:
            continue
        ckpt = stage_checkpoint(run_dir_of(cfg), stage.name)
        trained_by = checkpoint_code(ckpt)
        if trained_by is not None and trained_by != code_hash():
            other[stage.name] = trained_by
    if other and os.environ.get(RESUME_OTHER_CODE) != "1":
        stage, trained_by = next(iter(other.items()))
        raise FusionBenchError(
            f"stage {stage}: {stage_checkpoint(run_dir_of(cfg), stage)} was trained by other code (code_hash "
            f"{trained_by}; this code is {code_hash()}), so its weights may not be what this code trains. To train "
            f"again, delete {run_dir_of(cfg)} or set another output_dir; to continue from it anyway (e.g. the "
            f"change does not touch training), set {RESUME_OTHER_CODE}=1: the row then records trained_code_hash")
    for stage, trained_by in other.items():
        log(f"stage {stage}: continuing from a checkpoint trained by other code ({trained_by}; "
            f"{RESUME_OTHER_CODE}=1); its row records trained_code_hash")
    return other


def load_stage_checkpoint(model: VisionLanguageModel, path: Path, stage: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.set_stage(state.get("fusionbench_stage", stage))
    model.load_trainable_state_dict({k[len("model."):]: v for k, v in state["state_dict"].items()})


def steps_for_budget(model: VisionLanguageModel, data: FusionDataModule, tcfg: DictConfig) -> tuple[int, int]:
    """Compute matching: how many steps of this stage fit ``trainer.flops_budget`` training FLOPs
    (one step counted on a real batch of the training set), and the FLOPs per step."""
    from fusionbench.evaluation.efficiency import train_step_flops

    batch = data.collator()([data.train_ds[i] for i in range(min(tcfg.batch_size, len(data.train_ds)))])
    per_step = train_step_flops(model, batch)
    return max(1, int(tcfg.flops_budget // per_step)), per_step


def run_point(cfg: DictConfig, evaluate: bool = True, done_stages: frozenset[str] | set[str] = frozenset(),
              label: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train (and evaluate) one configuration, stage by stage; one results row per stage.

    Resumable: a stage whose checkpoint reached its last step is not trained again (its weights are
    loaded), a stage with an earlier checkpoint continues from it (``trainer.fit(ckpt_path=...)``),
    and stages in ``done_stages`` (rows already in the results) are not evaluated again. With a
    multi-process Lightning strategy (``ddp``) every rank trains, rank 0 alone evaluates and writes."""
    from fusionbench.memory import retain_freed_memory

    retain_freed_memory()  # gradients re-allocated every step come from the heap, not fresh pages
    if evaluate:
        check_writable(cfg.results_file)  # before any compute: the rows must have somewhere to go
    plan = stage_plan(cfg)
    check_plan_hardware(cfg, plan)
    other_code = check_checkpoint_code(cfg, plan, done_stages)
    prep = Prepared(cfg, text_suite=evaluate and cfg.eval.text_suite, evaluate=evaluate)  # everything that can fail on bad input fails here, before training
    model, data, tok = prep.model, prep.data, prep.tokenizer
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    from fusionbench.evaluation.multimodal import majority_answers

    # every stage's data is built and checked before the first stage trains
    stage_data = []
    for stage in plan:
        if stage.data == cfg.data:
            stage_data.append(data)
        else:
            dm = FusionDataModule(stage.data, stage.trainer, tok, prep.vision.preprocess, model.num_image_tokens,
                                  seed=cfg.seed)
            dm.setup("fit")
            stage_data.append(dm)
    rows = []
    for stage, data in zip(plan, stage_data):
        tcfg = stage.trainer
        model.set_stage(stage.name)
        data.train_cfg = tcfg
        extra: dict[str, Any] = {}
        if stage.name in other_code:
            extra["trained_code_hash"] = other_code[stage.name]
        if tcfg.flops_budget > 0:
            steps, per_step = steps_for_budget(model, data, tcfg)
            tcfg = OmegaConf.merge(tcfg, {"max_steps": steps})
            stage = OmegaConf.merge(stage, {"trainer": {"max_steps": steps}})
            data.train_cfg = tcfg
            extra.update(flops_budget=float(tcfg.flops_budget), flops_per_train_step=per_step)
            log(f"stage {stage.name}: {per_step / 1e9:.1f} GFLOP per training step -> {steps} steps in the budget "
                f"of {tcfg.flops_budget / 1e12:.2f} TFLOP")
        majority = majority_answers(data.train_ds)
        ckpt = stage_checkpoint(run_dir, stage.name)
        ckpt_dir = ckpt.parent
        resume = checkpoint_step(ckpt) if tcfg.checkpoint else None
        curve = curve_points = None
        is_zero = True
        t0 = time.time()
        train_s = None
        if resume is not None and resume >= tcfg.max_steps:
            log(f"stage {stage.name}: already trained ({resume} steps, {ckpt}); loading it")
            load_stage_checkpoint(model, ckpt, stage.name)
            extra["resumed_from_step"] = extra["steps"] = resume
            trained = read_stage_record(run_dir, stage.name, resume)
            if trained:  # how it trained, for the row: its curves, loss and training time
                curve_points = trained.pop("curve", None)
                train_s = trained.pop("train_s", None)
                extra.update(trained)
        else:
            from fusionbench.training.callbacks import TrainClock

            clock = TrainClock(t0)
            module = FusionModule(model, tcfg)
            callbacks = [clock]
            if prep.suite is not None and cfg.eval.curve_every_n_steps > 0:
                from fusionbench.training.callbacks import ForgettingCurve

                curve = ForgettingCurve(prep.curve_suite, prep.curve_base, tok, cfg.eval.curve_every_n_steps,
                                        cfg.eval.batch_size, reference=prep.reference)
                callbacks.append(curve)
            val_curve = None
            if cfg.eval.val_items > 0:
                from fusionbench.training.callbacks import ValidationCurve

                short_val = data.short_answers(data.val_ds)
                val_curve = ValidationCurve(short_val.select(range(min(cfg.eval.val_items, len(short_val)))),
                                            prep.vision.preprocess, cfg.eval.batch_size, seed=cfg.data.seed,
                                            controls=cfg.eval.val_controls, every_n_steps=tcfg.val_every_n_steps)
                callbacks.append(val_curve)
            if tcfg.checkpoint:
                callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=ckpt_dir, save_top_k=0, save_last=True,
                    every_n_train_steps=tcfg.checkpoint_every_n_steps or None))
            trainer = L.Trainer(max_steps=tcfg.max_steps, **hardware_kwargs(tcfg),
                                gradient_clip_val=tcfg.grad_clip or None,
                                logger=make_logger(tcfg.logger, run_dir, stage.name),
                                callbacks=callbacks, log_every_n_steps=tcfg.log_every_n_steps,
                                val_check_interval=tcfg.val_every_n_steps or tcfg.max_steps,
                                check_val_every_n_epoch=None, limit_val_batches=tcfg.limit_val_batches,
                                num_sanity_val_steps=0, enable_checkpointing=bool(tcfg.checkpoint),
                                enable_model_summary=False, deterministic=False)
            _warn_slow_cpu_bf16(trainer, tcfg)
            if resume:
                log(f"stage {stage.name}: resuming from step {resume} ({ckpt})")
                extra["resumed_from_step"] = resume
            log(f"stage {stage.name}: training {model.param_counts()['params_trainable']:,} parameters "
                f"for {tcfg.max_steps} steps")
            if tcfg.compile:
                prefix = model.uses_text_prefix_cache
                n = compile_decoder_layers(model)
                log(f"trainer.compile: {n} decoder blocks compiled" + ("; the shared prompt prefix's KV cache is off "
                                                                       "(it recompiled every block)" if prefix else ""))
            # what training ran with, beside the config's wish (trainer.compile turns the cache off)
            extra["cache_text_prefix_used"] = model.uses_text_prefix_cache
            data.resume_step = 0  # set from the checkpoint (FusionDataModule.load_state_dict) when resuming
            trainer.fit(module, datamodule=data, ckpt_path=ckpt if resume else None)
            trained: dict[str, Any] = {}
            if resume:
                # the same batches in the same order and the same random draws as without the interruption
                # (False: a checkpoint of an older fusionbench, or a distributed run)
                trained["resume_exact"] = bool(data.resume_exact) and getattr(module, "restored_rng", False)
                log(f"stage {stage.name}: " + (
                    "the resume was exact (the same batches in the same order and the same random draws as "
                    "without the interruption), so Lightning's 'dataloader is not resumable' warning does not apply"
                    if trained["resume_exact"] else
                    "the resume was NOT exact (an older checkpoint or a distributed run): the row says "
                    "resume_exact=False"))
                if not clock.restored:  # a checkpoint of an older fusionbench: its earlier seconds are unknown
                    trained["train_s_from_step"] = resume
            is_zero = trainer.is_global_zero
            trained["steps"] = trainer.global_step  # the optimizer steps actually taken
            trained["train_machines"] = json.dumps(clock.machines)  # every session's machine, from its step
            if tcfg.checkpoint and (checkpoint_step(ckpt) or 0) < tcfg.max_steps:
                trainer.save_checkpoint(ckpt)  # the stage's final weights, whatever the schedule
            final_loss = trainer.callback_metrics.get("train/loss")
            trained["train_loss_final"] = float(final_loss) if final_loss is not None else None
            if val_curve is not None and val_curve.points:
                from fusionbench.training.callbacks import plateaued

                trained["val_curve"] = json.dumps(val_curve.points)
                trained["converged"] = plateaued(val_curve.points, tol=cfg.eval.plateau_tol)
                trained.update({f"{k}_final": v for k, v in val_curve.points[-1].items() if k != "step"})
            # seconds of training over every session this stage ran in (up to the checkpoint each resumed from)
            train_s = clock.elapsed()
            curve_points = curve.points if curve is not None else None
            extra.update(trained)
            if tcfg.checkpoint and is_zero:
                stage_record(run_dir, stage.name).write_text(json.dumps(
                    {**trained, "train_s": train_s, **({"curve": curve_points} if curve_points is not None else {})},
                    indent=1, default=str))
        if train_s is None:  # already trained, and no record of it: the seconds of this session only
            train_s = time.time() - t0
        if not evaluate or not is_zero:
            log(f"stage {stage.name}: trained in {train_s:.0f}s; checkpoint in {run_dir / 'checkpoints'}")
            continue
        if stage.name in done_stages:
            log(f"stage {stage.name}: its row is already in {cfg.results_file}; not evaluated again")
            continue
        t_eval = time.time()
        metrics = evaluate_model(cfg, prep, model, data, majority)
        eval_s = time.time() - t_eval
        if label:
            extra["grid_point"] = json.dumps(label, sort_keys=True, default=str)
        row = result_row(cfg, stage, model, run_dir, metrics, train_s=train_s, eval_s=eval_s, **extra,
                         **({"curve": json.dumps(curve_points)} if curve_points is not None else {}))
        append_row(cfg.results_file, row)
        rows.append(row)
        _summary(row)
    return rows


def evaluate_model(cfg: DictConfig, prep: Prepared, model: VisionLanguageModel, data: FusionDataModule,
                   majority: dict[str, str]) -> dict[str, Any]:
    """The evaluation block of a run (also ``fusionbench eval``): every evaluator ``eval.metrics``
    lists (fusionbench.evaluation), in order, on ``prep.eval_device`` (the model and the base LM kept
    for the prose KL move there and back: Lightning leaves a trained model on the CPU; evaluators
    build their batches on the CPU and the model moves them), eagerly (:func:`scoring_mode`).
    ``eval_device`` in the metrics: where the model's weights were."""
    from fusionbench.evaluation import EvalContext, evaluate

    with on_device(model, prep.reference, device=prep.eval_device), scoring_mode():
        where = device_label(next(model.parameters()).device)
        metrics = evaluate(EvalContext(cfg, prep, model, data, majority), list(cfg.eval.metrics))
    return {"eval_device": where, **metrics}


def result_row(cfg: DictConfig, stage: DictConfig, model: VisionLanguageModel, run_dir: Path,
               metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One results row: identity, cost, provenance, metrics and the full resolved config."""
    t = stage.trainer
    return {
        "experiment": cfg.name, "strategy": cfg.fusion.name, "stage": stage.name, "seed": cfg.seed,
        "lm": cfg.lm.source, "vision": cfg.vision.source, "data": stage.data.name,
        "steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, **model.param_counts(),
        # the strategy's own answer for its validated options (the report reads it from here)
        "text_invariant": bool(model.fusion.text_invariant), "frozen_text_prefix": bool(model.fusion.frozen_text_prefix),
        **{k: (round(v, 2) if k.endswith("_s") else v) for k, v in extra.items()},
        "config_hash": config_hash(cfg), "point_hash": config_hash(cfg, drop=("seed",)), "run_dir": str(run_dir), **provenance(), **metrics,
        "config": json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True),
    }


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, stage: str | None = None,
                 results_file: str | None = None, allow_partial: bool = False) -> dict[str, Any]:
    """``fusionbench eval RUN_DIR``: rebuild a trained run from its saved config and the checkpoint
    of its last (or the named) stage, evaluate it like ``run`` does, append a row (``source:
    eval``). Overrides may change only ``eval.*`` (what is measured), never what was trained."""
    from fusionbench.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FusionBenchError(f"{run_dir} is not a run directory (no config.yaml); runs are under output_dir/<name>/")
    bad = [o for o in overrides or [] if not o.startswith("eval.")]
    if bad:
        raise FusionBenchError(f"fusionbench eval takes only eval.* overrides (what is measured), got {bad}")
    cfg = load_config(run_dir / "config.yaml", list(overrides or []))
    plan = stage_plan(cfg)
    names = [s.name for s in plan]
    if stage is not None and stage not in names:
        raise FusionBenchError(f"run has no stage {stage!r}; its stages: {', '.join(names)}")
    chosen = next(s for s in plan if s.name == (stage or names[-1]))
    ckpt = stage_checkpoint(run_dir, chosen.name)
    if not ckpt.exists():
        raise FusionBenchError(f"no checkpoint {ckpt} (was the run trained with trainer.checkpoint=true?)")
    steps = checkpoint_step(ckpt)
    if steps is None:
        raise FusionBenchError(f"cannot read the checkpoint {ckpt}")
    target = checkpoint_target(ckpt, chosen)
    if (target is None or steps < target) and not allow_partial:
        of = (f"step {steps} of {target}: the run did not finish" if target is not None else
              f"step {steps} of a compute-matched stage whose step count it does not record (older code): "
              "whether the run finished is unknown")
        raise FusionBenchError(f"{ckpt} is from {of} (resume it with the same command, or evaluate it as it is "
                               f"with --allow-partial; the row then says steps: {steps})")
    trained_by = checkpoint_code(ckpt)
    other_code = trained_by is not None and trained_by != code_hash()
    if other_code:
        log(f"{ckpt} was trained by other code (code_hash {trained_by}; this code is {code_hash()}): "
            "the row records it as trained_code_hash")
    check_writable(results_file or cfg.results_file)
    prep = Prepared(cfg, text_suite=cfg.eval.text_suite)
    model = prep.model
    load_stage_checkpoint(model, ckpt, chosen.name)
    data = prep.data
    if chosen.data != cfg.data:
        data = FusionDataModule(chosen.data, chosen.trainer, prep.tokenizer, prep.vision.preprocess,
                                model.num_image_tokens, seed=cfg.seed)
        data.setup("fit")
    from fusionbench.evaluation.multimodal import majority_answers

    t0 = time.time()
    metrics = evaluate_model(cfg, prep, model, data, majority_answers(data.train_ds))
    # how the checkpoint was trained (val curve, final loss, training seconds), where its stage recorded it
    trained = read_stage_record(run_dir, chosen.name, steps)
    curve_points = trained.pop("curve", None)
    trained.pop("steps", None)
    if other_code:
        trained["trained_code_hash"] = trained_by
    row = result_row(cfg, chosen, model, run_dir, metrics, **trained, eval_s=time.time() - t0, source="eval",
                     steps=steps, checkpoint=str(ckpt),
                     **({"curve": json.dumps(curve_points)} if curve_points is not None else {}))
    append_row(results_file or cfg.results_file, row)
    _summary(row)
    return row


def _summary(row: dict[str, Any]) -> None:
    keys = [k for k in row if k.startswith("mm/") and not k.startswith("mm/choice/") and k.count("/") == 2
            and k.endswith("/acc")]
    parts = [f"{k[3:-4]}={row[k]:.3f} (maj {row.get(k + '_majority', float('nan')):.3f})" for k in sorted(keys)]
    fg = row.get("forgetting/mc_acc_drop")
    cap = f" CIDEr={row['cap/cider']:.3f} (text-only {row['cap/cider_text_only']:.3f})" if "cap/cider" in row else ""
    acc = f" acc={row['mm/acc']:.3f}" if "mm/acc" in row else ""
    if "mm/choice/acc" in row:
        acc = (f" choice acc={row['mm/choice/acc']:.3f} (chance {row['mm/choice/chance']:.3f}"
               + (f", shuffled images {row['mm/choice/acc_shuffled']:.3f}, image gain "
                  f"{row['mm/choice/image_gain']:+.3f} [{row['mm/choice/image_gain_ci_lo']:+.3f}, "
                  f"{row['mm/choice/image_gain_ci_hi']:+.3f}]" if "mm/choice/image_gain" in row else "")
               + ");" + (f" exact match{acc}" if acc else ""))
    log(f"{row['strategy']}/{row['stage']}:{acc}{cap} " + " ".join(parts)
        + (f" mc_acc_drop={fg:+.4f}" if fg is not None else "")
        + (f" kl={row['text/kl']:.2e}" if "text/kl" in row else "")
        + (f" train {row['train_s']:.0f}s" if "train_s" in row else "") + f" eval {row['eval_s']:.0f}s")


def run(cfg: DictConfig, evaluate: bool = True) -> list[dict[str, Any]]:
    git_sha(), code_hash()  # provenance of the code loaded now, not of the tree when the last row is written
    points = grid_points(cfg)  # validates every point before the first one starts
    rows = []
    for i, (label, point) in enumerate(points):
        if len(points) > 1:
            log(f"grid point {i + 1}/{len(points)}")
        rows += run_point(point, evaluate=evaluate, label=label)
    return rows
