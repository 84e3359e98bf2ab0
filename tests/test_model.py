"Cross-cutting properties of the whole model: causality, gradient flow, reproducibility, parameter counts."
from dataclasses import replace

import pytest
import torch

from vishwamai import Vishwamai, VishwamaiConfig, dense_baseline, param_counts
from vishwamai.model import next_token_loss

CFG = VishwamaiConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))


# Past logits when only later tokens change. Structural causality (no gradient path from the future) is tested
# exactly in tests/test_causality.py; these tests check values. Where every matrix product has the same shape whatever
# the later tokens are (the dense model, and the capacity dispatch, whose expert buffers have a fixed shape), BLAS
# rounds each row the same way and past logits are bit-identical. The dropless dispatches (loop, grouped) multiply
# each expert's rows in one call whose row count depends on the routing of all tokens, later ones included, and a
# BLAS may round a row differently in a call with another row count (seen on an AMD EPYC: up to 3e-16 in float64).
# 1e-12 bounds that rounding with a wide margin; the leaks these tests exist to catch move logits by more than 1e-3.
DROPLESS_BOUND = 1e-12
CAUSAL_CASES = {"dense": (dense_baseline(CFG), 0.0), "capacity": (replace(CFG, moe_impl="capacity", capacity_factor=0.5), 0.0),
                "grouped": (CFG, DROPLESS_BOUND), "loop": (replace(CFG, moe_impl="loop"), DROPLESS_BOUND),
                "sinusoidal": (replace(CFG, pos_encoding="sinusoidal"), DROPLESS_BOUND),
                "groups+shared": (replace(CFG, num_experts=8, num_expert_groups=4, top_groups=2, shared_expert=True), DROPLESS_BOUND)}


def _max_past_change(model, x, y, t):
    return (model(y).logits[:, : t + 1] - model(x).logits[:, : t + 1]).abs().max().item()


@pytest.mark.exact
@pytest.mark.parametrize("name", list(CAUSAL_CASES))
@pytest.mark.parametrize("T", [37, 64])
def test_the_future_never_changes_the_past(name, T):
    "Exact (bound 0) where shapes are fixed; a stated rounding bound for the dropless MoE dispatches (see above)."
    cfg, bound = CAUSAL_CASES[name]
    torch.manual_seed(0)
    model = Vishwamai(cfg).double().eval()
    x = torch.randint(0, cfg.vocab_size, (2, T))
    for t in (0, 5, T // 2, T - 2):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, cfg.vocab_size, y[:, t + 1:].shape)
        assert _max_past_change(model, x, y, t) <= bound, f"T={T}: positions <= {t} changed"


def _dropping_capacity_model():
    "A float64 model whose capacity dispatch (factor 0.5) drops assignments."
    torch.manual_seed(0)
    return Vishwamai(replace(CFG, moe_impl="capacity", capacity_factor=0.5)).double().eval()


@pytest.mark.exact
def test_capacity_routing_is_causal_within_and_across_sequences_with_drops():
    "The capacity dispatch's buffers have fixed shapes, so every comparison with a batch of the same shape is exact."
    model = _dropping_capacity_model()
    x = torch.randint(0, model.cfg.vocab_size, (3, 48))
    out = model(x)
    assert all(0.2 < float(s["dropped_fraction"]) < 0.8 for s in out.moe_stats)  # the queues really drop
    y = x.clone()
    y[0] = torch.randint(0, model.cfg.vocab_size, (48,))  # another sequence in row 0
    assert torch.equal(model(y).logits[1:], out.logits[1:])  # rows 1 and 2 do not see it
    y = x.clone()
    y[:, 30:] = torch.randint(0, model.cfg.vocab_size, (3, 18))
    assert torch.equal(model(y).logits[:, :30], out.logits[:, :30])


def test_capacity_routing_is_the_same_alone_and_in_a_batch():
    "Alone, the buffers have another shape, so BLAS may round differently: the bound of the dropless case applies."
    model = _dropping_capacity_model()
    x = torch.randint(0, model.cfg.vocab_size, (4, 40))
    batch = model(x).logits
    for i in range(4):
        assert (model(x[i:i + 1]).logits[0] - batch[i]).abs().max() <= DROPLESS_BOUND


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = Vishwamai(replace(CFG, num_experts=2, top_k=2))  # top_k == num_experts: every expert is used
    x = torch.randint(0, CFG.vocab_size, (2, 40))
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


def test_aux_loss_alone_reaches_every_router():
    torch.manual_seed(0)
    model = Vishwamai(CFG)
    x = torch.randint(0, CFG.vocab_size, (2, 40))
    model(x).aux_loss.backward()
    for block in model.blocks:
        assert block.moe.router.weight.grad.abs().sum() > 0


@pytest.mark.exact
def test_seeded_model_and_forward_are_reproducible():
    "Exact: the same seed, shapes and kernels on the same machine."
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = Vishwamai(CFG)
        x = torch.randint(0, CFG.vocab_size, (2, 30))
        outs.append(model(x, labels=x).loss)
    assert torch.equal(outs[0], outs[1])


def test_labels_are_shifted_inside_the_model():
    torch.manual_seed(0)
    model = Vishwamai(CFG)
    x = torch.randint(0, CFG.vocab_size, (2, 30))
    out = model(x, labels=x)
    torch.testing.assert_close(out.loss, next_token_loss(out.logits[:, :-1], x[:, 1:]) + out.aux_loss)


@pytest.mark.parametrize("change", [{}, {"tie_embeddings": False}, {"use_moe": False}, {"fusion": "static"},
                                    {"attention": "full"}, {"ffn_hidden": 0}, {"shared_expert": True}])
def test_parameter_count_formula_matches_the_module(change):
    cfg = replace(CFG, **change)
    assert sum(p.numel() for p in Vishwamai(cfg).parameters()) == param_counts(cfg)["total"]


@pytest.mark.exact
def test_gradient_checkpointing_gives_identical_gradients():
    "Exact: the recomputed forward repeats the same kernels on the same shapes, and every accumulation in the backward is in a fixed order."
    torch.manual_seed(0)
    plain = Vishwamai(CFG).double()
    ckpt = Vishwamai(replace(CFG, gradient_checkpointing=True)).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, CFG.vocab_size, (2, 40))
    for m in (plain, ckpt): m(x, labels=x).loss.backward()
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), n


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 128]]), r"\[0, 128\)"),
    (torch.zeros(1, 65, dtype=torch.long), "max_seq_len"),
    (torch.zeros(1, 8), "integer"),
])
def test_bad_token_ids_are_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Vishwamai(CFG)(bad)
