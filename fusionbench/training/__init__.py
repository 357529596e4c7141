from fusionbench.training.datamodule import FusionDataModule
from fusionbench.training.module import FusionModule

__all__ = ["FusionDataModule", "FusionModule"]
