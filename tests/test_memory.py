"Gradient checkpointing changes no gradient, and it cuts the activation memory autograd keeps."
from dataclasses import replace

import pytest
import torch
from torch import nn

from vishwamai.config import VishwamaiConfig
from vishwamai.memory import SavedBytes, SavedTensorCounter, activation_memory, memory_sweep
from vishwamai.model import Vishwamai

CFG = VishwamaiConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=4, max_seq_len=128, ffn_hidden=64, num_experts=4,
                      top_k=2, expert_dim=32, expert_hidden=48, level_windows=(16, 8, None))


def _pair(cfg):
    "Two float64 models with the same weights, without and with checkpointing."
    torch.manual_seed(0)
    plain = Vishwamai(replace(cfg, gradient_checkpointing=False)).double()
    ckpt = Vishwamai(replace(cfg, gradient_checkpointing=True)).double()
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _grads(model, ids, which, seed=1):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    getattr(out, which).backward()
    return getattr(out, which).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout,jitter", [(0.0, 0.0), (0.2, 0.0), (0.1, 0.2)])
@pytest.mark.parametrize("which", ["loss", "aux_loss"])
def test_checkpointing_gives_identical_gradients(dropout, jitter, which):
    plain, ckpt = _pair(replace(CFG, dropout=dropout, router_jitter=jitter))
    ids = torch.randint(0, CFG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    (v1, g1), (v2, g2) = _grads(plain, ids, which), _grads(ckpt, ids, which)
    assert torch.equal(v1, v2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1: assert torch.equal(g1[name], g2[name]), name
    if which == "aux_loss":  # the auxiliary loss reaches every router through the recomputation
        for i in range(CFG.n_layers): assert g2[f"blocks.{i}.moe.router.weight"].abs().sum() > 0
    if dropout > 0:  # dropout is really on: another seed changes the value
        assert not torch.equal(_grads(ckpt, ids, which, seed=2)[0], v2)


def test_checkpointing_is_off_in_eval_and_no_grad():
    plain, ckpt = _pair(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 20))
    ckpt.eval()
    assert activation_memory(ckpt, ids).activations > 0  # activation_memory switches to training mode...
    assert not ckpt.training  # ...and restores the mode
    with torch.no_grad(): assert torch.equal(ckpt(ids).logits, plain.eval()(ids).logits)


def test_saved_bytes_drop_by_a_large_factor():
    plain, ckpt = _pair(replace(CFG, n_layers=4))
    ids = torch.randint(0, CFG.vocab_size, (2, 96))
    a, b = activation_memory(plain, ids), activation_memory(ckpt, ids)
    assert a.activations > 8 * b.activations
    assert a.parameters > b.parameters > 0  # checkpointed blocks no longer hold their weights in the outer graph
    block_inputs = 4 * 2 * 96 * CFG.d_model * 8  # float64
    assert b.activations >= block_inputs  # each checkpointed block keeps its input


def test_counter_dedupes_storages_and_separates_parameters():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorCounter() as c: y = x * x + x.sin()  # x saved three times, one storage
    assert c.result == SavedBytes(400, 0, 1)
    lin = nn.Linear(100, 7, bias=False)
    with SavedTensorCounter(lin) as c: y = lin(x.exp()[None])  # exp saves its output; linear saves it again and the weight
    assert c.result == SavedBytes(400, 2800, 1)
    with SavedTensorCounter() as c:
        (x * 2).exp().sum()  # this graph is dropped: its saved output is freed
    assert c.result == SavedBytes(0, 0, 0)
    with pytest.raises(TypeError, match="iterable of tensors"): SavedTensorCounter(params=["w"])


def test_memory_sweep_rows_and_errors():
    rows = memory_sweep(replace(CFG, n_layers=2), (16, 32), batch_size=1, peak=False)
    assert [(r["seq_len"], r["checkpointing"]) for r in rows] == [(16, False), (16, True), (32, False), (32, True)]
    assert rows[2]["saved"] > rows[0]["saved"] and rows[3]["saved"] > rows[1]["saved"]
    with pytest.raises(ValueError, match="max_seq_len"): memory_sweep(CFG, (256,))
    with pytest.raises(TypeError, match="VishwamaiConfig"): memory_sweep(dict(d_model=32), (16,))
    with pytest.raises(TypeError, match="nn.Module"): activation_memory("model", torch.zeros(1, 4, dtype=torch.long))
