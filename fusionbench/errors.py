"""One exception type for every input problem caught before compute starts."""


class FusionBenchError(Exception):
    """Bad input: a config, an asset, a dataset or a shape that cannot work. Raised early, with one
    message that says what is wrong and how to fix it."""


class AssetUnavailable(FusionBenchError):
    """A backbone or dataset cannot be obtained here (no hub access, missing package file, ...)."""
