"The MoE layer: the three dispatches compute the same function (forward and gradients), causal capacity, losses, errors, purity."
from dataclasses import replace

import pytest
import torch

from vishwamai.config import VishwamaiConfig, param_counts
from vishwamai.bench import bench_moe
from vishwamai.experts import CapacityState, Experts, capacity_budget, causal_capacity_plan, grouped_mm_supported
from vishwamai.moe import MoE


def _grads(module, x, impl):
    x = x.clone().requires_grad_()
    module.zero_grad()
    module.impl = impl
    res = module(x)
    weight = torch.linspace(-1, 1, res.out.numel(), dtype=res.out.dtype).view_as(res.out)
    ((res.out * weight).sum() + res.aux_loss).backward()
    return res, [x.grad] + [p.grad.clone() for p in module.parameters()]


def _assert_same(a, b, tol):
    torch.testing.assert_close(a[0].out, b[0].out, rtol=tol, atol=tol)
    for ga, gb in zip(a[1], b[1]): torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


CASES = [dict(num_experts=6, top_k=2), dict(num_experts=8, top_k=1, shared_expert=True),
         dict(num_experts=8, top_k=3, num_expert_groups=4, top_groups=2, router_scoring="sigmoid")]


@pytest.mark.parametrize("case", CASES)
def test_dispatches_agree_float64(case):
    "float64: loop, grouped (padded fallback), and capacity with room for everything agree to rounding."
    cfg = VishwamaiConfig(d_model=16, expert_dim=8, expert_hidden=12, **case)
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    with torch.no_grad(): moe.experts.norm_weight.normal_(1, 0.2); moe.experts.norm_bias.normal_(0, 0.2)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    ref = _grads(moe, x, "loop")
    _assert_same(_grads(moe, x, "grouped"), ref, 1e-10)
    moe.experts.capacity_factor = cfg.num_experts / cfg.top_k
    cap = _grads(moe, x, "capacity")
    assert cap[0].stats["dropped_fraction"] == 0
    _assert_same(cap, ref, 1e-10)


def test_grouped_mm_path_agrees_fp32():
    cfg = VishwamaiConfig(d_model=16, num_experts=8, top_k=2, expert_dim=16, expert_hidden=32, shared_expert=True)
    torch.manual_seed(1)
    moe = MoE(cfg)
    assert grouped_mm_supported(torch.zeros(1, 16), moe.experts.w1)
    x = torch.randn(2, 24, 16)
    ref = _grads(moe, x, "loop")
    _assert_same(_grads(moe, x, "grouped"), ref, 1e-5)
    moe.experts.use_grouped_mm = False
    _assert_same(_grads(moe, x, "grouped"), ref, 1e-5)


def test_capacity_drops_are_counted_and_contribute_zero():
    "Every token picks experts 0 and 1 at capacity factor 1: the budget ceil(2t/4) lets through every other token."
    cfg = VishwamaiConfig(d_model=16, num_experts=4, top_k=2, expert_dim=8, expert_hidden=8, capacity_factor=1.0)
    ex = Experts(cfg)
    N = 20
    idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)], 1)
    out, dropped = ex(torch.randn(N, 16), idx, torch.full((N, 2), 0.5), "capacity")
    assert [capacity_budget(t, 2, 4, 1.0) for t in (1, 2, 3, 4, 20)] == [1, 1, 2, 2, 10]
    torch.testing.assert_close(dropped, torch.tensor(0.5))
    assert out[1::2].abs().max() == 0 and out[0::2].abs().min() > 0


def _plan_by_recursion(idx, E, factor, k):
    "The causal queue one token at a time: K_e(t) = min(K_e(t-1) + a_e(t), B(t)); keep when K_e grows."
    S, T, _ = idx.shape
    keep, slot = torch.zeros(S, T, k, dtype=torch.bool), torch.zeros(S, T, k, dtype=torch.long)
    for s in range(S):
        kept = [0] * E
        for t in range(T):
            budget = capacity_budget(t + 1, k, E, factor)
            for j, e in enumerate(idx[s, t].tolist()):
                if kept[e] < budget: keep[s, t, j], slot[s, t, j], kept[e] = True, kept[e], kept[e] + 1
    return keep, slot


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_causal_capacity_plan_matches_the_recursion_and_resumes(factor):
    "The closed form equals the token-by-token queue; carried state in chunks (decoding) gives the same plan."
    torch.manual_seed(0)
    E, k, T = 6, 2, 33
    logits = torch.randn(3, T, E) + torch.tensor([2.0, 1, 0, 0, 0, 0])  # skewed: some experts overflow
    idx = logits.topk(k, -1).indices
    keep, slot, C = causal_capacity_plan(idx, E, factor)
    want_keep, want_slot = _plan_by_recursion(idx, E, factor, k)
    assert torch.equal(keep, want_keep) and torch.equal(slot[keep], want_slot[keep])
    assert 0 < (~keep).sum() and slot[keep].max() < C
    state, start, parts = CapacityState(torch.zeros(3, E, dtype=torch.long), torch.zeros(3, E, dtype=torch.long)), 0, []
    for n in (1, 7, 1, 1, 11, 12):  # a prompt, then tokens one or a few at a time
        k_part, s_part, _ = causal_capacity_plan(idx[:, start:start + n], E, factor, start, state)
        parts.append(k_part)
        start += n
    assert torch.equal(torch.cat(parts, 1), keep)


def test_aux_loss_reaches_router_and_stats():
    cfg = VishwamaiConfig(d_model=16, num_experts=4, top_k=2, expert_dim=16, expert_hidden=16)
    moe = MoE(cfg)
    res = moe(torch.randn(2, 8, 16))
    g, = torch.autograd.grad(res.aux_loss, moe.router.weight)
    assert g.abs().sum() > 0
    assert res.stats["load"].sum() == 2 * 8 * 2
    assert set(res.stats) == {"load", "dropped_fraction", "router_entropy", "balance_loss", "z_loss"}
    assert all(isinstance(v, torch.Tensor) for v in res.stats.values())


def test_param_count_matches_config():
    cfg = VishwamaiConfig(d_model=24, num_experts=6, top_k=2, expert_dim=12, expert_hidden=20, shared_expert=True,
                          n_layers=1, ffn_hidden=0)
    assert sum(p.numel() for p in MoE(cfg).parameters()) == param_counts(cfg)["moe"]


def test_bad_input_errors():
    moe = MoE(VishwamaiConfig(d_model=16, num_experts=4, top_k=2), name="layer 3")
    with pytest.raises(ValueError, match="d_model=16"): moe(torch.randn(2, 5, 15))
    with pytest.raises(TypeError, match="floating-point"): moe(torch.ones(2, 5, 16, dtype=torch.long))
    bad = torch.randn(2, 5, 16); bad[1, 2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="MoE layer 3: router logits are not finite"): moe(bad)
    with pytest.raises(TypeError, match="VishwamaiConfig"): MoE(dict(d_model=16))
    with pytest.raises(ValueError, match="unknown impl"): moe.experts(torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), "fast")
    for kw, field in [(dict(num_experts=4, top_k=5), "top_k"), (dict(num_experts=6, num_expert_groups=4), "num_expert_groups"),
                      (dict(num_experts=8, num_expert_groups=4, top_groups=1, top_k=3), "top_groups"),
                      (dict(capacity_factor=0.0), "capacity_factor"), (dict(router_temperature=-0.5), "router_temperature")]:
        with pytest.raises(ValueError, match=f"VishwamaiConfig.{field}"): MoE(VishwamaiConfig(**kw))


def test_forward_is_pure_and_update_bias_moves_bias():
    cfg = VishwamaiConfig(d_model=16, num_experts=4, top_k=2, bias_update_rate=0.1)
    moe = MoE(cfg)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    res = moe(torch.randn(2, 8, 16))
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())
    moe.update_bias(torch.tensor([8., 0, 0, 0]))
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="load must have shape"): moe.update_bias(res.stats["load"][:3])


def test_grouped_path_traces_without_graph_breaks():
    import torch._dynamo
    cfg = VishwamaiConfig(d_model=16, num_experts=4, top_k=2, expert_dim=16, expert_hidden=32, moe_impl="grouped")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(MoE(cfg).bfloat16())(torch.randn(2, 8, 16).bfloat16())
    assert explained.graph_break_count == 0


def test_bench_moe_rows():
    rows = bench_moe(experts=(4,), tokens=64, d_model=32, hidden=32, dtype=torch.float32, device="cpu",
                     warmup=0, repeats=1, verbose=False)
    assert [r["impl"] for r in rows] == ["loop", "grouped", "capacity", "dense"]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and "device" in r and "torch" in r for r in rows)


@pytest.mark.parametrize("impl,grouped_mm", [("grouped", False), ("capacity", None)])
def test_dispatch_paths_trace_without_graph_breaks_as_training_compiles_them(impl, grouped_mm):
    "fp32 forces the padded fallback, whose largest expert count is a data-dependent size; the compiled training step"
    " (`compile_step`) turns such sizes into symbolic ones. The reference loop is eager by design and not checked."
    import torch._dynamo
    cfg = VishwamaiConfig(d_model=16, num_experts=4, top_k=2, expert_dim=16, expert_hidden=32, moe_impl=impl)
    moe = MoE(cfg)
    moe.experts.use_grouped_mm = grouped_mm
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch._dynamo.reset()
        assert torch._dynamo.explain(moe)(torch.randn(2, 8, 16)).graph_break_count == 0
