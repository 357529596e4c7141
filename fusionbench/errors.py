"""One exception type for every input problem caught before compute starts."""
import difflib
from typing import Callable, Iterable


def did_you_mean(word: str, options: Iterable[str], spell: Callable[[str], str] = repr) -> str:
    """``" Did you mean 'x'?"`` for the option closest to ``word`` ("" when none is close)."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" Did you mean {spell(close[0])}?" if close else ""


class FusionBenchError(Exception):
    """Bad input: a config, an asset, a dataset or a shape that cannot work. Raised early, with one
    message that says what is wrong and how to fix it."""


class AssetUnavailable(FusionBenchError):
    """A backbone or dataset cannot be obtained here (no hub access, missing package file, ...)."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, for quoting it in one-line errors (the
    exception's type name when the message is empty: ``str(IndexError())`` is "")."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
