import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Each test session gets its own cache unless a test is an integration test (real assets)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("FUSIONBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
