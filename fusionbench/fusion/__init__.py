"""Fusion strategies: one file each in this package, registered by name with ``@register``."""
from fusionbench.fusion.base import FUSIONS, FusionOptions, FusionStrategy, fusion_options, register

__all__ = ["FUSIONS", "FusionOptions", "FusionStrategy", "fusion_options", "register"]
