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


# --- batches of prompts of different lengths, end of text, nucleus sampling ---------------------------------------

def _left_pad(prompts, pad_value=0, extra=0):
    "A left-padded batch and its attention mask, as a tokenizer with padding_side='left' makes them."
    T = max(len(p) for p in prompts) + extra
    ids = torch.full((len(prompts), T), pad_value)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    return ids, mask


BATCH_VARIANTS = {"windows (8, 4)": CFG, "full": replace(CFG, attention="full"),
                  "capacity 0.5": replace(CFG, moe_impl="capacity", capacity_factor=0.5, level_windows=(3, 2, None))}


@pytest.mark.parametrize("name", BATCH_VARIANTS)
def test_each_padded_prompt_generates_as_it_would_alone_float64(name):
    model = _model(BATCH_VARIANTS[name])
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (3, 9, 1, 14)]  # and not multiples of 4
    ids, mask = _left_pad(prompts)
    got = model.generate(ids, 10, temperature=0, attention_mask=mask, output_logits=True)
    assert torch.equal(got.sequences[:, : ids.shape[1]], ids)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 10, temperature=0, output_logits=True)
        assert torch.equal(got.sequences[b, ids.shape[1]:], alone.sequences[0, len(p):])
        # float64: a matrix product rounds a row by the number of rows in the call (~1e-16 here); 1e-12 is far above that
        assert (got.logits[b] - alone.logits[0]).abs().max() < 1e-12, (b, (got.logits[b] - alone.logits[0]).abs().max())
    # the padding never reaches the model: other pad ids and more padding change no bit
    ids2, mask2 = _left_pad(prompts, pad_value=CFG.vocab_size - 1, extra=3)
    again = model.generate(ids2, 10, temperature=0, attention_mask=mask2, output_logits=True)
    assert torch.equal(again.logits, got.logits) and torch.equal(again.sequences[:, ids2.shape[1]:], got.sequences[:, ids.shape[1]:])


def test_padded_batches_sample_and_recompute_like_the_cache():
    model = _model(CFG)
    ids, mask = _left_pad([torch.arange(2, 7), torch.arange(1, 3)])
    cached, plain = (model.generate(ids, 50, top_p=0.8, attention_mask=mask, generator=torch.Generator().manual_seed(7),
                                    use_cache=u) for u in (True, False))  # 5 + 50 tokens: past max_seq_len = 48
    assert torch.equal(cached, plain) and cached.shape == (2, 55)


def test_end_of_text_stops_a_row_and_pads_it():
    model = _model(CFG)
    ids, mask = _left_pad([torch.arange(3, 9), torch.arange(20, 22)])
    free = model.generate(ids, 12, temperature=0, attention_mask=mask)
    eos = int(free[0, ids.shape[1] + 3])  # what row 0 says as its 4th new token
    first = [(free[b, ids.shape[1]:] == eos).nonzero()[0, 0].item() if (free[b, ids.shape[1]:] == eos).any() else 12
             for b in range(2)]
    out = model.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=1)
    assert out.shape[1] == ids.shape[1] + min(12, max(f + 1 for f in first))  # stops when every row has ended
    for b, f in enumerate(first):
        new = out[b, ids.shape[1]:]
        assert torch.equal(new[: f + 1], free[b, ids.shape[1]: ids.shape[1] + f + 1][: len(new)])
        assert (new[f + 1:] == 1).all()
    everyone = model.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=[eos, int(free[1, -12])])
    assert everyone.shape[1] < ids.shape[1] + 12


def test_top_p_samples_only_from_the_nucleus():
    from vishwamai.model import sample_next
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()[None].expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, top_p=0.75, generator=g)[:, 0]
    assert set(drawn.tolist()) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.15
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    want = torch.tensor([0, 0.4, 0, 0.3, 0.15]).double() / 0.85
    assert (freq - want).abs().max() < 0.03  # 4000 draws: a standard error of about 0.008
    everything = torch.bincount(sample_next(logits, generator=g)[:, 0], minlength=5).double() / len(drawn)
    assert (everything - probs).abs().max() < 0.03
    assert (sample_next(logits, top_p=0.3, generator=g) == 1).all() and (sample_next(logits, top_k=1, generator=g) == 1).all()


def test_bad_generation_arguments_are_refused():
    model = _model(CFG)
    ids, mask = _left_pad([torch.arange(3), torch.arange(1)])
    for kwargs, message in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(eos_token_id=CFG.vocab_size), "eos_token_id"),
                            (dict(attention_mask=mask.flip(1)), "left-padded"), (dict(attention_mask=mask[:, 1:]), "shape"),
                            (dict(attention_mask=mask * torch.tensor([[1], [0]])), "at least one token"),
                            (dict(pad_token_id=-1, eos_token_id=2), "pad_token_id")]:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, -1)
    assert torch.equal(model.generate(ids, 0), ids) and model.generate(ids, 0, output_logits=True).logits.shape == (2, 0, 128)


# --- causal capacity in cached decoding ----------------------------------------------------------------------------

def test_cached_decoding_with_capacity_drops_the_same_assignments_float64(monkeypatch):
    import vishwamai.experts as experts
    model = _model(replace(CFG, moe_impl="capacity", capacity_factor=0.5))
    ids = torch.randint(0, CFG.vocab_size, (3, 40), generator=torch.Generator().manual_seed(8))
    plans = []
    plan = experts.causal_capacity_plan
    def recording(*args, **kwargs):
        result = plan(*args, **kwargs)
        plans.append(result[0])  # keep [S, T, k]: which assignments the queues keep
        return result
    monkeypatch.setattr(experts, "causal_capacity_plan", recording)
    with torch.no_grad(): whole = model(ids)
    want_keep = plans[:]  # one [S, T, k] keep map per layer
    dropped = [s["dropped_fraction"].item() for s in whole.moe_stats]
    assert min(dropped) > 0.05, dropped  # drops really happen in every layer
    for chunks in ([(0, 1)] + [(t, t + 1) for t in range(1, 40)], [(0, 5), (5, 6), (6, 17), (17, 33), (33, 40)]):
        plans.clear()
        cache = model.new_cache()
        with torch.no_grad(): got = torch.cat([model(ids[:, a:b], cache=cache).logits for a, b in chunks], 1)
        # float64: a matrix product rounds a row by the number of rows in the call (~1e-16 here); 1e-12 is far above that
        assert (got - whole.logits).abs().max() < 1e-12, (got - whole.logits).abs().max()
        for layer in range(CFG.n_layers):
            keep = torch.cat(plans[layer::CFG.n_layers], 1)
            assert torch.equal(keep, want_keep[layer])
        assert [s.dropped.sum().item() for s in cache.capacity] == [(~k).sum().item() for k in want_keep]


# --- no host reads while generating on an accelerator -----------------------------------------------------------

def test_generation_on_an_accelerator_reads_nothing_back(monkeypatch):
    import vishwamai.model as model_module
    model = _model(CFG, torch.float32)
    reads = []
    def counting(name):
        real = getattr(torch.Tensor, name)
        return lambda self, *a: reads.append(name) or real(self, *a)
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    prompt = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(9))
    model.generate(prompt, 8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert reads  # on the CPU the checks run (they cost nothing there)
    reads.clear()
    monkeypatch.setattr(model_module, "is_cpu", lambda x=None: False)  # as on CUDA or XLA
    model.generate(prompt, 8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert reads == []
    assert all(m.host_checks for m in model.modules() if isinstance(m, model_module.HostChecks))  # restored after


# --- generation on XLA's CPU device ----------------------------------------------------------------------------

_XLA_GENERATE = r"""
import json
import torch, torch_xla
from vishwamai import Vishwamai, VishwamaiConfig
from vishwamai.device import resolve_device
from vishwamai.xla import compile_count
dev = resolve_device("xla")
cfg = VishwamaiConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, num_experts=4, top_k=2, max_seq_len=64, expert_dim=16,
                      expert_hidden=16, ffn_hidden=16, level_windows=(8, 4, None), moe_impl="capacity", attn_impl="xla")
torch.manual_seed(0)
model = Vishwamai(cfg).eval()
prompt = torch.randint(0, 64, (2, 5))
want = model.generate(prompt, 40, temperature=0)
sampled = model.generate(prompt, 10, top_p=0.9, generator=torch.Generator().manual_seed(1))
model.to(dev)
out = {"compiles": []}
for n in (16, 40, 40):
    got = model.generate(prompt.to(dev), n, temperature=0)
    out[f"greedy_{n}"] = torch.equal(got.cpu(), want[:, : 5 + n])
    out["compiles"].append(compile_count())
s = model.generate(prompt.to(dev), 10, top_p=0.9, generator=torch.Generator().manual_seed(1))
out["sampled"] = torch.equal(s.cpu(), sampled)
print(json.dumps(out))
"""


def test_generation_on_xla_compiles_nothing_new_after_warm_up():
    import importlib.util
    import json
    if importlib.util.find_spec("torch_xla") is None: pytest.skip("torch_xla is not installed")
    from vishwamai.sharding import run_on_xla_cpu
    out = json.loads(run_on_xla_cpu(_XLA_GENERATE, num_devices=1).strip().splitlines()[-1])
    print("XLA compiles after generating 16, 40 and again 40 new tokens:", out["compiles"])
    assert out["greedy_16"] and out["greedy_40"] and out["sampled"]  # equal to the CPU, a host generator on XLA
    # 24 more tokens: one new graph at most, the output's assembly (its shape [B, T + n] is new), none per token
    assert out["compiles"][1] - out["compiles"][0] <= 1
    assert out["compiles"][2] == out["compiles"][1]  # the same length again: nothing new at all
