"""Same seed, same machine, several threads: the same run, bit for bit.

On a CPU, torch adds the gradient of advanced indexing (`weight[ids]`, `x[token]`) with parallel atomic adds when
more than one thread runs, so rows that collide are summed in whatever order the threads reach them. The model
gathers only through ops whose backward sums in a fixed order (`F.embedding`, `index_select`, whose backward is a
serial `index_add_`), which these tests check in the autograd graph and in two identical training runs.
"""
from dataclasses import replace

import pytest
import torch

from vishwamai import Vishwamai, VishwamaiConfig

TINY = VishwamaiConfig.preset("tiny")


def backward_ops(loss):
    "Names of every node in the autograd graph of `loss`."
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen: continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("moe_impl", ["loop", "grouped", "capacity"])
def test_no_gradient_flows_through_advanced_indexing(moe_impl):
    model = Vishwamai(replace(TINY, n_layers=1, moe_impl=moe_impl))
    x = torch.randint(0, TINY.vocab_size, (2, 32))
    ops = backward_ops(model(x, labels=x).loss)
    assert "EmbeddingBackward0" in ops and "IndexSelectBackward0" in ops  # the walk sees the gathers
    assert "IndexBackward0" not in ops  # its backward is index_put_ with accumulation: parallel atomics on a CPU


def _short_run(moe_impl, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Vishwamai(replace(TINY, moe_impl=moe_impl))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(6):
        x = torch.randint(0, TINY.vocab_size, (8, 128), generator=data)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.exact
@pytest.mark.parametrize("moe_impl", ["grouped", "capacity"])
def test_two_identical_runs_are_bit_identical_with_several_threads(moe_impl):
    "Exact: the same kernels on the same shapes and the same machine, with every accumulation in a fixed order."
    threads = torch.get_num_threads()
    try:
        n = max(2, threads)  # the parallel kernels run only with more than one thread
        (l1, w1), (l2, w2) = _short_run(moe_impl, n), _short_run(moe_impl, n)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(l1, l2) and torch.equal(w1, w2)
