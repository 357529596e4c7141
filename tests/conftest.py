import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, request):
    """Each test session gets its own cache unless a test is an integration test (real assets). Its
    own MonkeyPatch, not the test's: a test's ``monkeypatch.undo()`` must not send the rest of that
    test to the user's cache (~/.cache/fusionbench, shared with running sweeps)."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield
