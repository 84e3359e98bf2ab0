"Balancing losses: the source document's loss has exactly zero router gradient; the others reach the router."
import pytest
import torch

from vishwamai.balance import (assignment_mask, balance_bias_step, document_balance_loss, expert_load, load_cv,
                               router_z_loss, switch_balance_loss)
from vishwamai.config import VishwamaiConfig
from vishwamai.router import Router


def _routed(seed=0):
    torch.manual_seed(seed)
    router = Router(VishwamaiConfig(d_model=16, num_experts=8, top_k=2))
    x = torch.randn(64, 16)
    return router, x, router(x)


@pytest.mark.exact
def test_document_loss_has_zero_router_gradient():
    "Exact: the document's loss has no differentiable path to the router, so it adds an exact zero to every gradient."
    router, x, r = _routed()
    doc = document_balance_loss(r.scores.view(4, 16, 8), assignment_mask(r.experts, 8).view(4, 16, 8), 8)
    assert doc > 0
    task = r.gates.square().sum()
    g_task, = torch.autograd.grad(task, router.weight, retain_graph=True)
    g_both, = torch.autograd.grad(task + doc, router.weight)
    assert torch.equal(g_task, g_both)
    # and numerically: a small change of every router weight leaves it unchanged (piecewise constant)
    with torch.no_grad():
        router.weight.add_(1e-4 * torch.randn_like(router.weight))
        r2 = router(x)
    assert document_balance_loss(r2.scores.view(4, 16, 8), assignment_mask(r2.experts, 8).view(4, 16, 8), 8) == doc


def test_switch_loss_reaches_every_expert_through_full_softmax():
    router, x, r = _routed()
    unused = torch.ones(8, dtype=torch.bool)
    unused[r.experts.unique()] = False
    loss = switch_balance_loss(r.logits, r.experts)
    g, = torch.autograd.grad(loss, router.weight)
    assert g.abs().sum() > 0
    if unused.any():  # an expert nobody chose still gets gradient, because P comes from the full softmax
        assert g[unused].abs().sum() > 0


def test_switch_loss_values():
    torch.testing.assert_close(switch_balance_loss(torch.zeros(8, 4), (torch.arange(8) % 4)[:, None]), torch.tensor(1.0))
    collapsed = torch.tensor([[20., 0, 0, 0]]).repeat(6, 1)
    assert abs(switch_balance_loss(collapsed, torch.zeros(6, 1, dtype=torch.long)).item() - 4) < 1e-3


def test_z_loss():
    router, x, r = _routed()
    torch.testing.assert_close(router_z_loss(torch.zeros(2, 4)), torch.log(torch.tensor(4.0)) ** 2)
    g, = torch.autograd.grad(router_z_loss(r.logits), router.weight)
    assert g.abs().sum() > 0


def test_load_and_bias_step():
    load = expert_load(torch.tensor([[0, 1], [1, 3], [1, 0]]), 5)
    assert torch.equal(load, torch.tensor([2., 3, 0, 1, 0]))
    assert load_cv(torch.full((4,), 3.0)) == 0
    bias = torch.zeros(5)
    balance_bias_step(bias, load, 0.5)
    torch.testing.assert_close(bias, torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5]))  # mean load 1.2
    assert not bias.requires_grad


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4), (6, 3)])
def test_cv_ceiling_for_top_k(E, k):
    "All load on k experts is the most uneven top-k routing: CV = sqrt(E/k - 1); random routings stay below it."
    ceiling = (E / k - 1) ** 0.5
    torch.testing.assert_close(load_cv(expert_load(torch.arange(k).repeat(50, 1), E)), torch.tensor(ceiling))
    torch.manual_seed(E * k)
    picks = torch.rand(64, E).topk(k, dim=-1).indices  # k distinct experts per token
    assert load_cv(expert_load(picks, E)) < ceiling
