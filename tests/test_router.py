"Two-stage top-k routing: the group bound, agreement with a brute-force definition, gates and the selection bias."
from dataclasses import replace

import pytest
import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.router import Router, two_stage_topk


def brute_force(scores, k, G, M):
    "The GUIDE's definition, token by token."
    N, E = scores.shape
    per = E // G
    out = []
    for s in scores:
        group_score = torch.stack([s[g * per:(g + 1) * per].topk(min(2, per)).values.sum() for g in range(G)])
        kept = group_score.topk(M).indices
        allowed = torch.cat([torch.arange(g * per, (g + 1) * per) for g in kept.tolist()])
        out.append(set(allowed[s[allowed].topk(k).indices].tolist()))
    return out


@pytest.mark.parametrize("E,G,M,k", [(8, 4, 1, 2), (8, 4, 2, 3), (16, 4, 3, 4), (12, 3, 3, 2), (6, 6, 2, 1)])
def test_two_stage_matches_definition(E, G, M, k):
    torch.manual_seed(E + G + M + k)
    scores = torch.rand(50, E)
    got = two_stage_topk(scores, k, G, M)
    assert [set(r.tolist()) for r in got] == brute_force(scores, k, G, M)
    groups_used = [len(set((r // (E // G)).tolist())) for r in got]
    assert max(groups_used) <= M


def test_all_groups_is_plain_topk():
    scores = torch.rand(30, 16)
    assert torch.equal(two_stage_topk(scores, 4, 4, 4).sort(-1).values, scores.topk(4).indices.sort(-1).values)


def test_router_gates_and_dtype():
    cfg = VishwamaiConfig(d_model=16, num_experts=8, top_k=2, num_expert_groups=2, top_groups=1)
    router = Router(cfg)
    r = router(torch.randn(20, 16).bfloat16())
    assert r.logits.dtype == torch.float32 and r.gates.dtype == torch.float32
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(20))
    assert (r.experts // 4 == r.experts[:, :1] // 4).all()  # one kept group of 4


def test_top1_gate_is_raw_score_and_has_gradient():
    router = Router(VishwamaiConfig(d_model=8, num_experts=4, top_k=1))
    r = router(torch.randn(10, 8))
    torch.testing.assert_close(r.gates[:, 0], r.scores.max(-1).values)
    r.gates.sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_bias_moves_selection_not_gates():
    cfg = VishwamaiConfig(d_model=8, num_experts=4, top_k=2, router_scoring="sigmoid")
    router = Router(cfg)
    x = torch.randn(10, 8)
    before = router(x)
    router.expert_bias[3] = 100.0
    after = router(x)
    assert (after.experts == 3).any(-1).all()
    torch.testing.assert_close(after.scores, before.scores)  # scores (and so gate values) ignore the bias
    chosen = after.scores.gather(-1, after.experts)
    torch.testing.assert_close(after.gates, chosen / chosen.sum(-1, keepdim=True))


def test_temperature_and_jitter():
    cfg = VishwamaiConfig(d_model=8, num_experts=4, top_k=2)
    base, hot = Router(cfg), Router(replace(cfg, router_temperature=2.0))
    hot.load_state_dict(base.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(hot(x).logits, base(x).logits / 2)
    jit = Router(replace(cfg, router_jitter=0.2)); jit.load_state_dict(base.state_dict())
    assert not torch.equal(jit.train()(x).logits, base(x).logits)
    assert torch.equal(jit.eval()(x).logits, base(x).logits)
