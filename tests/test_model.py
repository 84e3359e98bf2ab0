"Cross-cutting properties of the whole model: causality, gradient flow, reproducibility, parameter counts."
from dataclasses import replace

import pytest
import torch

from vishwamai import Vishwamai, VishwamaiConfig, dense_baseline, param_counts
from vishwamai.model import next_token_loss

CFG = VishwamaiConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, pos_encoding="sinusoidal"), dense_baseline(CFG),
                                 replace(CFG, num_experts=8, num_expert_groups=4, top_groups=2, shared_expert=True)],
                         ids=["vishwamai", "sinusoidal", "dense", "groups+shared"])
@pytest.mark.parametrize("T", [37, 64])
def test_the_future_never_changes_the_past(cfg, T):
    torch.manual_seed(0)
    model = Vishwamai(cfg).double().eval()
    x = torch.randint(0, cfg.vocab_size, (2, T))
    ref = model(x).logits
    for t in (0, 5, T // 2, T - 2):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, cfg.vocab_size, y[:, t + 1:].shape)
        assert torch.equal(model(y).logits[:, :t + 1], ref[:, :t + 1]), f"T={T}: positions <= {t} changed"


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


def test_seeded_model_and_forward_are_reproducible():
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


def test_gradient_checkpointing_gives_identical_gradients():
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
