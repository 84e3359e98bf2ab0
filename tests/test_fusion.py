"Level fusion: the fused sum and its weights (the attention tests check the fused output for causality)."
import pytest
import torch

from vishwamai.fusion import AdaptiveLevelFusion, StaticLevelFusion, fuse_levels
from vishwamai.levels import upsample

FACTORS = (1, 2, 4)


@pytest.mark.parametrize("T", [16, 13, 1])
def test_fuse_levels_is_the_weighted_sum_of_upsampled_levels(T):
    torch.manual_seed(T)
    ys = [torch.randn(2, 4, -(-T // r), 8, dtype=torch.float64) for r in FACTORS]
    w = torch.randn(2, T, 4, 3, dtype=torch.float64).softmax(-1)
    explicit = sum(w[..., i].transpose(1, 2)[..., None] * upsample(y, r, T) for i, (y, r) in enumerate(zip(ys, FACTORS)))
    torch.testing.assert_close(fuse_levels(ys, FACTORS, w), explicit, atol=1e-12, rtol=0)  # same products, summed in another order


def test_weights_are_convex_and_static_ones_constant():
    x = torch.randn(2, 10, 32)
    adaptive, static = AdaptiveLevelFusion(32, 4, 3, init_std=1.0), StaticLevelFusion(4, 3)
    with torch.no_grad(): static.logits.normal_()
    for w in (adaptive(x), static(x)):
        assert w.shape == (2, 10, 4, 3) and (w > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 10, 4))
    assert torch.equal(static(x)[0, 0], static(x)[1, 9])
    assert not torch.allclose(adaptive(x)[0, 0], adaptive(x)[0, 1])

