"Token embedding and position encodings."
import math

import pytest
import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.embedding import RotaryEmbedding, TokenEmbedding, apply_rope, rope_cos_sin, sinusoidal_positions
from vishwamai.levels import level_positions


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


def test_rope_rotates_each_half_split_pair():
    "x·cos + rotate_half(x)·sin is the 2×2 rotation of pair (i, i + D/2) by the angle position × θ_i."
    torch.manual_seed(0)
    D, positions = 8, torch.tensor([0, 1, 5, 100])
    x = torch.randn(len(positions), D, dtype=torch.float64)
    got = apply_rope(x, *rope_cos_sin(positions, D))
    for t, m in enumerate(positions.tolist()):
        for i in range(D // 2):
            phi = m * 10000.0 ** (-2 * i / D)
            R = torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)
            # the library's cosines and sines are float32
            torch.testing.assert_close(got[t, [i, i + D // 2]], R @ x[t, [i, i + D // 2]], atol=1e-5, rtol=0)


def test_coarse_level_scores_are_level0_scores_every_r_positions():
    "Pooled tokens rotate at the positions they stand for, so a level of factor r samples the level-0 score every r."
    rope = RotaryEmbedding(32)
    torch.manual_seed(1)
    q, k = torch.randn(2, 32, dtype=torch.float64)
    def scores(r, n):  # query at the last pooled token against keys 0, 1, ... pooled tokens back
        qs, ks = rope(q.expand(n, -1), k.expand(n, -1), level_positions(n * r, r))
        return (qs[-1] * ks).sum(-1).flip(0)
    torch.testing.assert_close(scores(4, 64), scores(1, 256)[::4], atol=1e-3, rtol=0)  # float32 angles up to 255: rounded by up to ~1e-5 rad


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
