"MultiLevelAttention: causality, agreement of the kernels (CPU, XLA CPU device), equivalences, gradients, bad input."
import importlib.util
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from vishwamai import attention
from vishwamai.attention import MultiLevelAttention, multilevel_attention, resolve_attn_impl, sliding_window_block_mask
from vishwamai.bench import bench_attention
from vishwamai.config import VishwamaiConfig, param_counts
from vishwamai.levels import level_attention

CFG = VishwamaiConfig(vocab_size=64, d_model=32, n_heads=4, max_seq_len=64, level_windows=(6, 3, None), attn_impl="reference")
IMPLS = ("reference", "xla", "flex")


def _module(impl, **kw):
    torch.manual_seed(0)
    return MultiLevelAttention(replace(CFG, attn_impl=impl, **kw)).double()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [{}, {"fusion": "static"}, {"attention": "full"}])
@pytest.mark.exact
@torch.no_grad()  # values only (torch >= 2.13 runs FlexAttention on the CPU only without gradients)
def test_future_perturbation_bit_for_bit(impl, kw):
    "Exact: every product has the same shape whatever the later values are, so each row is rounded the same way."
    m = _module(impl, **kw).eval()
    T = 19  # not a multiple of 4
    x = torch.randn(2, T, 32, dtype=torch.float64)
    ref = m(x)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 10
        got = m(x2)
        assert torch.equal(got.out[:, : t + 1], ref.out[:, : t + 1]), t
        if ref.level_weights is not None: assert torch.equal(got.level_weights[:, : t + 1], ref.level_weights[:, : t + 1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r,window", [(1, 3), (2, 2), (4, None), (2, None)])
@pytest.mark.exact
def test_each_level_alone_is_causal_with_each_kernel(impl, r, window):
    "Exact, for the reason of the test above."
    torch.manual_seed(1)
    T = 22
    q, k, v = torch.randn(3, 1, 2, T, 8, dtype=torch.float64)
    ones = torch.ones(1, T, 2, 1, dtype=torch.float64)
    out = multilevel_attention(q, k, v, (r,), (window,), ones, impl)
    for t in (0, 1, 2, 3, 4, 7, 10, 13, 20):
        q2, k2, v2 = (a.clone() for a in (q, k, v))
        for a in (q2, k2, v2): a[..., t + 1:, :] += 1
        assert torch.equal(multilevel_attention(q2, k2, v2, (r,), (window,), ones, impl)[..., : t + 1, :], out[..., : t + 1, :])


def _out_and_grads(m, x):
    x = x.clone().requires_grad_()
    res = m(x)
    loss = res.out.square().sum() + (res.level_weights.square().sum() if res.level_weights is not None else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    return res.out.detach(), x.grad, grads


@pytest.mark.parametrize("impl", ["xla", "flex"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_kernels_agree_with_the_reference_forward_and_backward(impl, dtype, tol):
    if impl == "flex" and not attention._flex_cpu_backward(): pytest.skip(f"torch {torch.__version__} has no FlexAttention backward on the CPU")
    ref, other = _module("reference").to(dtype), _module(impl).to(dtype)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 45, 32, dtype=dtype)
    want, got = _out_and_grads(ref, x), _out_and_grads(other, x)
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol)
    for name in want[2]: torch.testing.assert_close(got[2][name], want[2][name], atol=tol, rtol=tol)


@pytest.mark.parametrize("fusion", ["adaptive", "static"])
def test_gradients_reach_every_projection_and_the_fusion(fusion):
    m = _module("reference", fusion=fusion)
    _, _, grads = _out_and_grads(m, torch.randn(2, 21, 32, dtype=torch.float64))
    assert set(grads) >= {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    assert any(n.startswith("fusion.") for n in grads)
    for name, g in grads.items(): assert g.abs().sum() > 0, name


def test_each_level_gets_gradient_through_the_fusion():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weights = torch.rand(1, 17, 2, 3, dtype=torch.float64).softmax(-1).requires_grad_()
    multilevel_attention(q, k, v, (1, 2, 4), (3, 2, None), weights).square().sum().backward()
    assert (weights.grad.abs().sum((0, 1, 2)) > 0).all()  # every level's output reaches the loss


def _sdpa_reference(m, x):
    B, T, d = x.shape
    q, k, v = (p(x).view(B, T, m.n_heads, -1).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    q, k = m.rope(q, k, torch.arange(T))
    return m.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", [dict(num_levels=1, level_windows=(40,)), dict(num_levels=1, level_windows=(None,)), dict(attention="full")])
def test_one_level_with_a_wide_window_is_plain_causal_attention(impl, kw):
    m = _module(impl, **kw)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x).out, _sdpa_reference(m, x), atol=1e-12, rtol=1e-12)


def test_parameter_layout_matches_param_counts():
    for c in (CFG, replace(CFG, fusion="static"), replace(CFG, attention="full")):
        assert sum(p.numel() for p in MultiLevelAttention(c).parameters()) == param_counts(c)["attention"] // c.n_layers


def test_bad_input_is_named():
    m = MultiLevelAttention(CFG)
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match=r"\[batch, seq, d_model\]"): m(x[0])
    with pytest.raises(TypeError, match="floating point"): m(x.long())
    with pytest.raises(TypeError, match="differs from the parameters"): m(x.double())
    with pytest.raises(ValueError, match="max_seq_len=64"): m(torch.randn(1, 65, 32))
    with pytest.raises(ValueError, match="d_model=32"): m(torch.randn(1, 5, 8))
    with pytest.raises(TypeError, match="must be a tensor"): m([[0.0] * 32])
    with pytest.raises(ValueError, match="VishwamaiConfig.n_heads"): VishwamaiConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="VishwamaiConfig.level_windows"): VishwamaiConfig(level_windows=(64, 0, None))
    with pytest.raises(ValueError, match="VishwamaiConfig.num_levels"): VishwamaiConfig(max_seq_len=2)


def test_any_length_up_to_max_seq_len_works():
    m = MultiLevelAttention(CFG)
    for T in (1, 2, 3, 5, 63, 64): assert m(torch.randn(1, T, 32)).out.shape == (1, T, 32)


def test_dropout_and_kernel_choice():
    assert resolve_attn_impl("auto", "cpu") == "xla"
    assert resolve_attn_impl("auto", "cuda") == "flex"
    assert resolve_attn_impl("auto", "cuda", dropout=True) == "xla"
    assert resolve_attn_impl("reference", "cuda") == "reference"
    with pytest.raises(ValueError, match="unknown attn_impl"): resolve_attn_impl("triton", "cpu")
    x = torch.randn(2, 20, 32)
    with pytest.raises(ValueError, match="no attention dropout"):
        MultiLevelAttention(replace(CFG, attn_impl="flex", dropout=0.2)).train()(x)
    m = MultiLevelAttention(replace(CFG, attn_impl="auto", dropout=0.2))
    m.train()
    assert not torch.equal(m(x).out, m(x).out)  # dropout is active in training
    m.eval()
    assert torch.equal(m(x).out, m(x).out)


@pytest.mark.parametrize("n,window,block", [(37, 5, 8), (300, 200, 128), (512, 64, 128)])
def test_closed_form_block_mask_matches_create_block_mask(n, window, block):
    from torch.nn.attention.flex_attention import create_block_mask
    ours = sliding_window_block_mask(n, window, block)
    theirs = create_block_mask(lambda b, h, q, k: (q - k >= 0) & (q - k < window), None, None, n, n, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), theirs.to_dense())


_XLA_CHECK = """
import torch, torch_xla
from dataclasses import replace
from vishwamai.attention import MultiLevelAttention
from vishwamai.config import VishwamaiConfig
torch.manual_seed(0)
cfg = VishwamaiConfig(vocab_size=64, d_model=32, n_heads=4, max_seq_len=64, level_windows=(6, 3, None), attn_impl="reference")
ref = MultiLevelAttention(cfg)
on_xla = MultiLevelAttention(replace(cfg, attn_impl="auto"))
on_xla.load_state_dict(ref.state_dict())
dev = torch_xla.device()
on_xla.to(dev)
x = torch.randn(2, 37, 32)
def run(m, x):
    x = x.clone().requires_grad_()
    res = m(x)
    (res.out.square().sum() + res.level_weights.square().sum()).backward()
    torch_xla.sync()
    return res.out, x.grad, {n: p.grad for n, p in m.named_parameters()}
want, got = run(ref, x), run(on_xla, x.to(dev))
assert got[0].device.type == "xla", got[0].device
close = lambda a, b: torch.testing.assert_close(a.cpu(), b, atol=2e-5, rtol=2e-5)
close(got[0], want[0]); close(got[1], want[1])
for name in want[2]: close(got[2][name], want[2][name])
print("XLA-OK")
"""


def test_xla_kernel_on_the_xla_cpu_device():
    # torch_xla must be imported before any autograd work in a process, so the check runs in a fresh interpreter
    if importlib.util.find_spec("torch_xla") is None:
        print("SKIP REASON: torch_xla is not installed")
        pytest.skip("torch_xla is not installed")
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    proc = subprocess.run([sys.executable, "-c", _XLA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "XLA-OK" in proc.stdout, proc.stderr[-3000:]


def test_bench_attention_returns_rows():
    rows = bench_attention(seq_lens=(64, 128), batch_tokens=128, n_heads=2, head_dim=8, windows=(8, 4, None),
                           warmup=0, repeats=1, memory=True, verbose=False)
    assert [r["N"] for r in rows] == [64, 128] and [r["batch"] for r in rows] == [2, 1]
    for r in rows:
        assert r["full_ms"] > 0 and r["multilevel_ms"] > 0 and r["speedup"] > 0
        assert r["full_peak_mb"] > 0 and r["multilevel_peak_mb"] > 0


needs_flex_cpu_backward = pytest.mark.skipif(not attention._flex_cpu_backward(),
                                             reason=f"torch {torch.__version__} has no FlexAttention backward on the CPU")
LENGTHS = (37, 64, 100, 129, 200, 255, 256, 300, 400, 513, 600, 777)  # 12 lengths, 1 to 7 FlexAttention blocks


def _flex_vs_reference(run, T):
    torch.manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
    weights = torch.rand(1, T, 2, 3).softmax(-1)
    args = (q, k, v, (1, 2, 4), (16, 8, None), weights)
    got, want = run(*args, "flex"), multilevel_attention(*args, "reference")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)  # float32 sums in another order
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (got, want)]
    for g, w in zip(*grads): torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


@needs_flex_cpu_backward
def test_compiled_flex_path_compiles_a_bounded_number_of_times_across_lengths(monkeypatch):
    # the path CUDA takes (compiled FlexAttention, pooling and fusion), run on the CPU with a compile-counting backend
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **kw, backend=counter))
    monkeypatch.setattr(attention, "_fused", lambda t: True)
    attention._compiled.cache_clear()
    counts = []
    try:
        with torch._dynamo.config.patch(recompile_limit=64):  # count every compile: the default limit of 8 would hide them
            for T in LENGTHS:
                _flex_vs_reference(multilevel_attention, T)
                counts.append(counter.frame_count)
    finally: attention._compiled.cache_clear()
    assert counts[-1] <= 8 and counts[-1] == counts[-8], counts  # few graphs, and no new one for the last 8 lengths


@needs_flex_cpu_backward
def test_block_mask_stays_out_of_a_whole_compiled_graph():
    graph_ops = []
    def backend(gm, example_inputs):
        graph_ops.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward
    run = torch.compile(multilevel_attention, backend=backend)  # default dynamic: shapes turn dynamic at the 2nd length
    with torch._dynamo.config.patch(recompile_limit=64):
        counts = []
        for T in LENGTHS:
            _flex_vs_reference(run, T)
            counts.append(len(graph_ops))
    assert counts[-1] == counts[-8], counts
    assert not any("argsort" in op for ops in graph_ops for op in ops)  # the mask's construction never entered a graph


def test_flex_backward_on_a_cpu_torch_without_it_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="attn_impl='xla'"):
        multilevel_attention(q, k, v, (1,), (8,), torch.ones(1, 40, 2, 1), "flex")
    q, k, v = (t.detach() for t in (q, k, v))
    multilevel_attention(q, k, v, (1,), (8,), torch.ones(1, 40, 2, 1), "flex")  # without gradients it runs
