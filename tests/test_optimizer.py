"""The optimizer training builds: fused AdamW by default, foreach on request, the same updates."""
import pytest
import torch
from omegaconf import OmegaConf

from fusionbench.config import config_hash, load_config
from fusionbench.errors import FusionBenchError
from fusionbench.training.module import make_optimizer


def _cfg(impl: str):
    return OmegaConf.create({"lr": 1e-2, "weight_decay": 0.01, "optimizer_impl": impl})


def _train(impl: str, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(17, 9)), torch.nn.Parameter(torch.randn(9))]
    opt = make_optimizer(params, _cfg(impl))
    for i in range(steps):
        loss = (params[0] @ params[1]).pow(2).sum() + params[1].sin().sum() * (i + 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def test_fused_is_the_default_and_foreach_is_available():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(p, load_config(None, []).trainer).defaults["fused"] is True
    foreach = make_optimizer(p, _cfg("foreach")).defaults
    assert not foreach["fused"] and foreach["foreach"] is True


def test_fused_and_foreach_give_the_same_updates():
    fused, foreach = _train("fused"), _train("foreach")
    start = _train("fused", steps=0)
    for a, b, s in zip(fused, foreach, start):
        assert not torch.equal(a, s)  # the steps moved the parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_impl_is_one_clear_error():
    with pytest.raises(FusionBenchError, match="optimizer_impl must be 'fused' or 'foreach'"):
        load_config(None, ["trainer.optimizer_impl=adam"])


def test_optimizer_impl_default_keeps_config_hashes():
    cfg = load_config(None, [])
    assert config_hash(cfg) == config_hash(load_config(None, ["trainer.optimizer_impl=fused"]))
    assert config_hash(cfg) != config_hash(load_config(None, ["trainer.optimizer_impl=foreach"]))
