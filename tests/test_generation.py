"Generation with the per-level cache: equal to recomputation, bounded memory, the max_seq_len boundary, bad input."
from dataclasses import replace

import pytest
import torch

from vishwamai import Vishwamai, VishwamaiConfig
from vishwamai.attention import MultiLevelAttention
from vishwamai.cache import AttentionCache, LevelCache, cache_entries
from vishwamai.embedding import RotaryEmbedding
from vishwamai.levels import causal_level

CFG = VishwamaiConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, num_experts=4, top_k=2, max_seq_len=48,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))
VARIANTS = {
    "windows (8, 4)": CFG,
    "eviction (2, 1)": replace(CFG, level_windows=(2, 1, None)),
    "default windows": replace(CFG, level_windows=(64, 32, None)),
    "full": replace(CFG, attention="full"),
    "sinusoidal": replace(CFG, pos_encoding="sinusoidal", level_windows=(3, 2, None)),
    "static fusion": replace(CFG, fusion="static", level_windows=(3, 2, None)),
    "xla kernel": replace(CFG, attn_impl="xla", level_windows=(3, 2, None)),
}
PROMPTS = (1, 6, 8, 13)  # lengths that are and are not multiples of 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "A decoding step's matrices are tiny: one thread is faster and steadier on a shared machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Vishwamai(cfg).to(dtype).eval()


@torch.no_grad()
def _decode(model, ids, prompt):
    "Logits of `ids` when the first `prompt` tokens prefill a cache and the others are fed one at a time."
    cache = model.new_cache()
    out = [model(ids[:, :prompt], cache=cache).logits] + [model(ids[:, t: t + 1], cache=cache).logits for t in range(prompt, ids.shape[1])]
    assert cache.length == ids.shape[1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("use_moe", [False, True], ids=["dense-ffn", "moe"])
def test_cached_decoding_equals_recomputation_float64(name, use_moe):
    model = _model(replace(VARIANTS[name], use_moe=use_moe))
    ids = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): want = model(ids).logits  # by causality (tested bit for bit elsewhere): recomputing each prefix
    # the MoE router computes its logits in float32, whose rounding depends on the number of rows: ~1e-8 there
    tol = 1e-7 if use_moe else 1e-12
    for prompt in PROMPTS:
        got = _decode(model, ids, prompt)
        assert (got - want).abs().max() < tol, (name, prompt, (got - want).abs().max().item())


@pytest.mark.parametrize("name", ["windows (8, 4)", "full", "sinusoidal"])
def test_every_step_matches_recomputing_the_whole_prefix(name):
    model = _model(VARIANTS[name])
    ids = torch.randint(0, CFG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        for t in range(5, ids.shape[1]):
            step = model(ids[:, t: t + 1], cache=cache).logits[:, -1]
            torch.testing.assert_close(step, model(ids[:, : t + 1]).logits[:, -1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["windows (8, 4)", "eviction (2, 1)", "full", "sinusoidal"])
def test_cached_decoding_is_close_in_float32(name):
    model = _model(VARIANTS[name], torch.float32)
    ids = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(): want = model(ids).logits
    for prompt in (1, 7):
        torch.testing.assert_close(_decode(model, ids, prompt), want, rtol=1e-4, atol=1e-5)


@pytest.mark.exact
def test_prefill_is_the_training_forward_bit_for_bit():
    "Exact: the prefill runs the training forward's kernels on the same shapes."
    model = _model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 21))
    with torch.no_grad():
        assert torch.equal(model(ids, cache=model.new_cache()).logits, model(ids).logits)


def test_feeding_the_cache_in_chunks():
    model = _model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 45))
    cache = model.new_cache()
    with torch.no_grad():
        got = torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in [(0, 3), (3, 4), (4, 17), (17, 45)]], 1)
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["windows (8, 4)", "eviction (2, 1)", "full", "sinusoidal"])
def test_greedy_generation_is_identical_with_and_without_the_cache(name):
    # float64: cached and recomputed logits differ by rounding (the MoE multiplies 1 row per step against T rows),
    # about 1e-16 here, so a near-tie between two tokens cannot flip the argmax or the sample on any CPU
    model = _model(VARIANTS[name])
    prompt = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    # 5 + 55 tokens: past max_seq_len = 48, where both recompute over the last 48 tokens
    cached = model.generate(prompt, 55, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 55, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 12, top_k=10, generator=torch.Generator().manual_seed(5), use_cache=u) for u in (True, False)]
    assert torch.equal(*sampled)


def test_a_full_cache_refuses_more_positions():
    model = _model(CFG)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)  # 48 = max_seq_len
        with pytest.raises(ValueError, match="max_seq_len=48"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.length == 48


def test_bad_caches_are_refused():
    model = _model(CFG)
    with pytest.raises(ValueError, match="model.new_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=_model(replace(CFG, n_layers=1)).new_cache())
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="prefill it first"):
        AttentionCache((1, 2), (4, None), 16).extend(*torch.randn(3, 1, 2, 1, 8), torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError, match="2 factors but 1 windows"):
        AttentionCache((1, 2), (4,), 16)


@torch.no_grad()
def test_windowed_levels_hold_constant_memory_and_the_global_level_grows_at_a_quarter():
    cfg = replace(CFG, max_seq_len=256, level_windows=(8, 4, None), n_layers=1)
    model = _model(cfg, torch.float32)
    cache = model.new_cache()
    ids = torch.randint(0, cfg.vocab_size, (1, 256))
    model(ids[:, :1], cache=cache)
    levels = cache.layers[0].levels
    history = []
    for t in range(1, 256):
        model(ids[:, t: t + 1], cache=cache)
        history.append([level.nbytes() for level in levels])
    history = torch.tensor(history)
    for i in (0, 1):  # windowed: the same bytes from the time the window is full (8 and 4 * 2 tokens) to the end
        assert (history[8:, i] == history[8, i]).all()
    entry = 2 * cfg.d_model * 4  # one key and one value, all heads, float32
    assert levels[2].count == 64 and 64 * entry <= levels[2].keys.nbytes + levels[2].values.nbytes < 2 * 64 * entry
    assert history[-1, 2] > 8 * history[0, 2]  # the global level does grow
    assert cache_entries(cfg, 256) == 8 + 4 + 64 == sum(min(lv.count, lv.keys.shape[-2]) for lv in levels)
    full = _model(replace(cfg, attention="full"), torch.float32)
    full_cache = full.new_cache()
    full(ids, cache=full_cache)
    assert full_cache.layers[0].levels[0].count == cache_entries(replace(cfg, attention="full"), 256) == 256


@pytest.mark.parametrize("r,window", [(1, None), (1, 3), (2, 2), (4, 1), (4, None), (8, 2)])
def test_each_level_cache_equals_the_reference_level(r, window):
    torch.manual_seed(0)
    N, rope = 37, RotaryEmbedding(8)
    q, k, v = torch.randn(3, 2, 2, N, 8, dtype=torch.float64)
    want = causal_level(q, k, v, r, window, rope)
    for prompt in (1, 5, 12):
        level = LevelCache(r, window, N)
        level.prefill(q[..., :prompt, :], k[..., :prompt, :], v[..., :prompt, :], rope)
        torch.testing.assert_close(level.out, want[..., prompt - 1: prompt, :], rtol=0, atol=1e-12)
        steps = [level.step(q[..., t: t + 1, :], k[..., t: t + 1, :], v[..., t: t + 1, :], t, rope) for t in range(prompt, N)]
        torch.testing.assert_close(torch.cat(steps, -2), want[..., prompt:, :], rtol=0, atol=1e-12)


def test_a_level_can_be_stepped_from_empty():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 19, 8, dtype=torch.float64)
    level = LevelCache(4, 2, 19)
    got = torch.cat([level.step(q[..., t: t + 1, :], k[..., t: t + 1, :], v[..., t: t + 1, :], t) for t in range(19)], -2)
    torch.testing.assert_close(got, causal_level(q, k, v, 4, 2), rtol=0, atol=1e-12)


def test_the_attention_module_without_a_cache_is_unchanged():
    "The training path takes no detour: the same output with and without an (empty) cache, bit for bit."
    torch.manual_seed(0)
    m = MultiLevelAttention(replace(CFG, attn_impl="reference")).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    assert torch.equal(m(x).out, m(x, AttentionCache.for_attention(m)).out)
