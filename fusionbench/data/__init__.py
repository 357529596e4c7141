"""Datasets (built through HF ``datasets``), chat formatting and collation."""
from fusionbench.registry import Registry

#: name -> builder ``fn(cfg: DataConfig, split: str) -> datasets.Dataset``
DATASETS: Registry = Registry("dataset", "fusionbench.data.sources")
register_dataset = DATASETS.register
