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


def _machine() -> str:
    """The machine: the CPU (its kernels' instruction set, model and flags' hash), the cores this
    process may use and whether bf16 is native, so that a slow or failing CI run can be told apart
    from a slow machine."""
    import torch

    from fusionbench.results import cpu_has_native_bf16, cpu_identity

    cpu = cpu_identity()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"fusionbench machine: {cpu.get('cpu_model')} ({cpu.get('cpu_capability')}), {cores} usable cores, "
            f"torch threads {torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}")


def pytest_report_header(config):
    return _machine()


def pytest_terminal_summary(terminalreporter):
    """Again at the end, where -q (make test) and a log's tail still show it."""
    terminalreporter.write_line(_machine())
