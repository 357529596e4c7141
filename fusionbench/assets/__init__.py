"""Asset layer: resolves language models, vision encoders and raw data files from three kinds of
source (``tiny`` random-init configs, the embedded offline default, any HF hub name or path)."""

from fusionbench.assets.paths import cache_dir
from fusionbench.assets.pypi import pypi_file

__all__ = ["cache_dir", "pypi_file"]
