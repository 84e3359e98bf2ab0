"Token embedding and position encodings."
import math

import pytest
import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.embedding import RotaryEmbedding, TokenEmbedding, sinusoidal_positions


def test_rope_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    def score(m, n):
        a, _ = rope(q, q, torch.tensor([m])); _, b = rope(k, k, torch.tensor([n]))
        return (a * b).sum().item()
    assert math.isclose(score(5, 2), score(105, 102), rel_tol=1e-5)
    assert not math.isclose(score(5, 2), score(5, 3), rel_tol=1e-3)
    qr, _ = rope(q, q, torch.tensor([37]))
    assert math.isclose(qr.norm().item(), q.norm().item(), rel_tol=1e-6)


def test_rope_keeps_dtype_and_rejects_odd_width():
    rope = RotaryEmbedding(8)
    q = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    assert rope(q, q, torch.arange(5))[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even"): RotaryEmbedding(7)


def test_token_embedding_positions_and_errors():
    cfg = VishwamaiConfig(vocab_size=50, d_model=8, n_heads=2, max_seq_len=16, pos_encoding="sinusoidal")
    emb = TokenEmbedding(cfg)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(emb(ids) - emb.weight[ids], sinusoidal_positions(10, 8).expand(2, 10, 8))
        torch.testing.assert_close(emb(ids[:, 4:], start=4), emb(ids)[:, 4:])
    with pytest.raises(TypeError, match="integer"): emb(ids.float())
    with pytest.raises(ValueError, match=r"\[batch, seq\]"): emb(ids[0])
    with pytest.raises(ValueError, match="max_seq_len=16"): emb(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 50\)"): emb(ids + 50)
