"""Honeybee C-Abstractor: token count and width, spatial sensitivity, clear errors."""
import pytest
import torch

from fusionbench.errors import FusionBenchError
from fusionbench.fusion import fusion_options
from fusionbench.fusion.c_abstractor import CAbstractor
from tests.helpers import image_batch, tiny_model


def _strategy(vision_tokens=16, vision_dim=32, lm_hidden=64, **options):
    torch.manual_seed(0)
    opts = fusion_options({"name": "c_abstractor", **options})
    return CAbstractor(opts, lm_hidden, vision_dim, vision_tokens).eval()


def test_num_queries_tokens_of_lm_width_on_the_tiny_tier():
    model = tiny_model("c_abstractor", "fusion={name: c_abstractor, num_queries: 4}")
    batch, _ = image_batch(model)
    features = model.encode_images(batch["pixel_values"])
    assert features.shape[1] == 16  # tiny_cnn: a 4x4 grid
    out = model.fusion.image_embeddings(features)
    assert model.num_image_tokens == 4
    assert out.shape == (2, 4, model.lm.config.hidden_size)


@pytest.mark.parametrize("tokens,queries", [(49, 16), (49, 4), (50, 9), (16, 1)])
def test_any_square_grid_and_a_cls_token(tokens, queries):
    s = _strategy(vision_tokens=tokens, num_queries=queries, hidden_size=16)
    with torch.no_grad():
        out = s.image_embeddings(torch.randn(3, tokens, 32))
    assert out.shape == (3, queries, 64)
    assert s.cls_token == (tokens == 50)


def test_spatial_layout_matters_unlike_a_mean_pool():
    # no position embedding: the sensitivity comes from the convolutions and the pooling alone
    s = _strategy(vision_tokens=16, num_queries=4, hidden_size=16, depth=1, pos_emb=False)
    x = torch.randn(2, 16, 32)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = x[:, perm]
    assert torch.allclose(x.mean(1), shuffled.mean(1), atol=1e-6)  # what a mean-pool would see: the same
    with torch.no_grad():
        a, b = s.image_embeddings(x), s.image_embeddings(shuffled)
        assert torch.equal(a, s.image_embeddings(x.clone()))
    assert (a - b).abs().max().item() > 1e-3
    # a pattern in the top-left quadrant is read mainly by the top-left output token
    base = torch.zeros(1, 4, 4, 32)
    moved = base.clone()
    moved[0, 0, 0] = 5.0
    with torch.no_grad():
        delta = (s.image_embeddings(moved.view(1, 16, 32)) - s.image_embeddings(base.view(1, 16, 32))).norm(dim=-1)
    assert delta[0].argmax().item() == 0


@pytest.mark.parametrize("queries", [3, 8, 10])
def test_non_square_num_queries_is_a_clear_error(queries):
    with pytest.raises(FusionBenchError, match="num_queries must be a square number"):
        _strategy(num_queries=queries)
    with pytest.raises(FusionBenchError, match="num_queries must be a square number"):
        tiny_model("c_abstractor", f"fusion={{name: c_abstractor, num_queries: {queries}}}")


def test_non_square_grid_and_too_many_queries_are_clear_errors():
    with pytest.raises(FusionBenchError, match="square grid.*gives 12 tokens"):
        _strategy(vision_tokens=12)
    with pytest.raises(FusionBenchError, match="more than the vision feature grid"):
        _strategy(vision_tokens=16, num_queries=25)
    with pytest.raises(FusionBenchError, match=r"expects vision features \[batch, 16, 32\]"):
        _strategy().image_embeddings(torch.randn(1, 9, 32))
