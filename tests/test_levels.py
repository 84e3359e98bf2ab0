"Causal levels: pooling, the dependency pattern of each level, future perturbation, cost accounting."
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from vishwamai.embedding import RotaryEmbedding
from vishwamai.levels import (attention_flops, causal_downsample, causal_level, level_attention, level_mask,
                              level_pairs, naive_downsample, pool_level, upsample, visible_tokens)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_pooling_a_prefix_gives_the_prefix_of_the_pooling(r):
    x = torch.randn(2, 3, 27, 5, dtype=torch.float64)
    full = causal_downsample(x, r)
    for T in range(1, 28):
        assert torch.equal(causal_downsample(x[..., :T, :], r), full[..., : -(-T // r), :])


def _dependency(T, r, window, downsample):
    x = torch.randn(1, T, 6, dtype=torch.float64, requires_grad=True)
    pooled = downsample(x, r)
    y = upsample(level_attention(pooled, pooled, pooled, window), r, T)
    return torch.stack([torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)[0][0].abs().sum(-1) > 0 for t in range(T)])


@pytest.mark.parametrize("T,r,window", [(16, 4, None), (13, 4, 2), (11, 2, 3), (9, 8, None), (10, 1, 4)])
def test_gradient_dependency_matches_visible_tokens_and_is_causal(T, r, window):
    torch.manual_seed(T)
    vis = visible_tokens(T, r, window)
    assert torch.equal(_dependency(T, r, window, causal_downsample), vis)
    assert not vis.triu(1).any()


def test_naive_pooling_leaks_the_future():
    torch.manual_seed(0)
    dep = _dependency(16, 4, None, naive_downsample)
    assert torch.equal(dep, visible_tokens(16, 4, None, causal=False))
    assert dep[0, 3]  # position 0 depends on token 3


@pytest.mark.parametrize("T", [13, 16, 18])
@pytest.mark.parametrize("r,window", [(1, None), (1, 3), (2, None), (2, 2), (4, None), (4, 1)])
def test_every_level_alone_passes_the_future_perturbation_test(T, r, window):
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k, v = torch.randn(3, 2, 2, T, 8, dtype=torch.float64)
    out = causal_level(q, k, v, r, window, rope)
    for t in range(T - 1):
        q2, k2, v2 = (a.clone() for a in (q, k, v))
        for a in (q2, k2, v2): a[..., t + 1:, :] = torch.randn_like(a[..., t + 1:, :]) * 100
        assert torch.equal(causal_level(q2, k2, v2, r, window, rope)[..., : t + 1, :], out[..., : t + 1, :]), t


def test_union_of_default_levels_reaches_exactly_the_past():
    T = 40
    union = visible_tokens(T, 1, 4) | visible_tokens(T, 2, 2) | visible_tokens(T, 4, None)
    assert torch.equal(union, torch.ones(T, T, dtype=torch.bool).tril())


def test_pair_counts_and_the_documents_21_16():
    for N, r, w in [(16, 1, None), (17, 2, 3), (13, 4, None), (50, 1, 7)]:
        assert level_pairs(N, r, w) == int(level_mask(-(-N // r), w).sum())
    N = 1 << 15
    full = attention_flops(N, 64)
    assert abs(attention_flops(N, 64, (1, 2, 4), (None, None, None)) / full - 21 / 16) < 1e-3
    assert attention_flops(N, 64, (1, 2, 4), (64, 32, None)) < full / 10


def test_bad_arguments_are_named():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="pooling factor"): causal_downsample(x, 0)
    with pytest.raises(ValueError, match="empty sequence"): causal_downsample(x[:0], 2)
    with pytest.raises(ValueError, match="window"): level_mask(4, -1)
    with pytest.raises(ValueError, match="one window per level"): attention_flops(8, 4, (1, 2), (None,))


# CUDA autocast's float32 policy, from torch's autocast op lists: the reductions below run in float32 on a CUDA device
# unless the call names a dtype, and the element-wise ops below always do. CPU autocast upcasts none of them, so the
# policy is emulated here at the dispatcher, where autocast itself acts.
_FP32_UNLESS_DTYPE = {"sum", "prod", "cumsum", "cumprod", "_softmax", "_log_softmax", "linalg_vector_norm"}
_FP32_ALWAYS = {"exp", "expm1", "log", "log1p", "log2", "log10", "pow", "reciprocal", "rsqrt", "logsumexp",
                "native_layer_norm", "native_group_norm", "norm", "cdist", "softplus"}


class CudaAutocastFloat32Policy(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        low = lambda t: isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
        if name in _FP32_ALWAYS or (name in _FP32_UNLESS_DTYPE and kwargs.get("dtype") is None):
            args, kwargs = tree_map(lambda t: t.float() if low(t) else t, (args, kwargs))
        return func(*args, **kwargs)


def test_the_emulated_cuda_policy_upcasts_a_plain_sum():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with CudaAutocastFloat32Policy():
        assert x.sum(-1).dtype == torch.float32 and x.unflatten(-1, (2, 4)).mean(-1).dtype == torch.bfloat16
        assert x.sum(-1, dtype=torch.float32).to(x.dtype).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_pooling_keeps_the_input_dtype_under_any_autocast(dtype, r):
    x = torch.randn(2, 3, 19, 8).to(dtype)
    rope = RotaryEmbedding(8)
    low = torch.float16 if dtype == torch.float16 else torch.bfloat16
    for ctx in (contextlib.nullcontext, lambda: torch.autocast("cpu", dtype=low), CudaAutocastFloat32Policy):
        with ctx():
            assert causal_downsample(x, r).dtype == dtype
            assert {t.dtype for t in pool_level(x, x, x, r, rope)} == {dtype}


@pytest.mark.exact
def test_low_precision_pooling_is_the_float32_mean_rounded_once():
    "Exact at r = 2: bf16 values are exact in float32, a sum of two does not depend on the order of its terms, / 2 is exact."
    x = torch.randn(2, 3, 19, 8).bfloat16()
    assert torch.equal(causal_downsample(x, 2), causal_downsample(x.float(), 2).bfloat16())
    torch.testing.assert_close(causal_downsample(x, 4), causal_downsample(x.float(), 4).bfloat16(), rtol=0.008, atol=0)
