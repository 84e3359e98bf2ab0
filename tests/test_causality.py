"""Causality, tested the way the math allows on any CPU.

Structurally and exactly: the gradient of past logits with respect to the embeddings of later tokens is exactly zero,
for every attention kernel and every MoE dispatch. Autograd produces exact zeros where no data path exists, whatever
the BLAS library rounds, so these tests hold on any CPU, thread count and instruction set.

In value: see tests/test_model.py (exact where shapes are fixed, a stated bound where the MoE's row counts vary).
"""
from dataclasses import replace

import pytest
import torch

from vishwamai import Vishwamai, VishwamaiConfig, dense_baseline

CFG = VishwamaiConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))
VARIANTS = {f"{attn}+{moe}": replace(CFG, attn_impl=attn, moe_impl=moe)
            for attn in ("reference", "xla", "flex") for moe in ("loop", "grouped", "capacity")}
VARIANTS.update({"dense": dense_baseline(CFG), "sinusoidal": replace(CFG, pos_encoding="sinusoidal"),
                 "capacity-drops": replace(CFG, moe_impl="capacity", capacity_factor=0.5),
                 "groups+shared": replace(CFG, num_experts=8, num_expert_groups=4, top_groups=2, shared_expert=True)})


def past_gradient_from_future(model, ids, t):
    "Gradient of a random projection of the logits at positions <= t with respect to every position's embedding."
    captured = []
    handle = model.embed.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try: logits = model(ids).logits
    finally: handle.remove()
    probe = torch.randn(logits[:, : t + 1].shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(t))
    grad, = torch.autograd.grad((logits[:, : t + 1] * probe).sum(), captured[0])
    return grad


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_gradient_reaches_the_past_from_the_future(name):
    torch.manual_seed(0)
    model = Vishwamai(VARIANTS[name]).double().eval()
    T = 37
    ids = torch.randint(0, CFG.vocab_size, (2, T))
    for t in (0, 5, 18, T - 2):
        grad = past_gradient_from_future(model, ids, t)
        assert torch.count_nonzero(grad[:, t + 1:]) == 0, f"{name}: positions > {t} reach positions <= {t}"
        assert torch.count_nonzero(grad[:, : t + 1]) > 0  # the probe does see the past: the test can fail
