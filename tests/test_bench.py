"Benchmarks: FLOP and memory formulas, out-of-memory rows, atomic result files, suite selection and the `bench` command."
import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from vishwamai import bench as B
from vishwamai.bench import (SUITES, attention_pairs, bench_train, causal_pairs, format_rows, run_guarded, run_suite,
                             run_suites, train_flops_per_token, train_step_bytes, write_json_atomic)
from vishwamai.config import VishwamaiConfig
from vishwamai.model import dense_baseline


@pytest.mark.parametrize("n,w", [(1, None), (7, None), (10, 3), (10, 10), (10, 20), (5, 1)])
def test_causal_pairs_counts_the_mask(n, w):
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (k <= q) & ((q - k < w) if w is not None else True)
    assert causal_pairs(n, w) == int(visible.sum())


def test_attention_flops_follow_the_levels():
    cfg = VishwamaiConfig.preset("small")
    full = dense_baseline(cfg)
    # levels of lengths N, N/2, N/4 (rounded up) with their windows
    N = 1000
    assert attention_pairs(cfg, N) == causal_pairs(1000, 256) + causal_pairs(500, 128) + causal_pairs(250)
    assert attention_pairs(full, N) == causal_pairs(N)
    # doubling N changes only the attention term: 12·d·L·(pairs(2N)/2N - pairs(N)/N)
    d, L = cfg.d_model, cfg.n_layers
    for c in (cfg, full):
        got = train_flops_per_token(c, 4096) - train_flops_per_token(c, 2048)
        want = 12 * d * L * (attention_pairs(c, 4096) / 4096 - attention_pairs(c, 2048) / 2048)
        assert got == pytest.approx(want, rel=1e-9)
    # windowed fine levels are linear in N, so at long N only the global quarter-length level counts: (N/4)² / N² = 1/16
    assert 1 / 16 < attention_pairs(cfg, 32768) / attention_pairs(full, 32768) < 1 / 12
    assert attention_pairs(full, 32768) / attention_pairs(full, 16384) == pytest.approx(4, rel=1e-3)


def test_matmul_flops_match_the_parameter_layout():
    # at N = 1 attention sees one pair per level; the rest is 6 FLOPs per active matmul weight
    cfg = VishwamaiConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, num_experts=4, top_k=2, expert_dim=64,
                          expert_hidden=128, ffn_hidden=128, level_windows=(16, 8, None), attention="full")
    dense = dense_baseline(cfg)
    per_layer = 4 * 64 * 64 + 2 * 64 * 2 * 128 + 2 * 64 * 128
    assert train_flops_per_token(dense, 1) == 6 * (2 * per_layer + 256 * 64) + 3 * 4 * 64 * 2


def test_train_step_estimate_is_an_overestimate_within_two():
    cfg = VishwamaiConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, num_experts=4, top_k=2, expert_dim=64,
                          expert_hidden=128, ffn_hidden=128, max_seq_len=128, level_windows=(16, 8, None))
    ids = torch.randint(0, 512, (4, 128))
    from vishwamai.model import Vishwamai, next_token_loss
    from vishwamai.timing import peak_memory
    for c in (cfg, dense_baseline(cfg)):
        def step():
            m = Vishwamai(c)
            opt = torch.optim.AdamW(m.parameters())
            out = m(ids)
            (next_token_loss(out.logits[:, :-1], ids[:, 1:]) + out.aux_loss).backward(); opt.step()
        ratio = train_step_bytes(c, 4, 128) / peak_memory(step)
        assert 1.0 <= ratio < 2.0, (c.attention, ratio)


def test_out_of_memory_is_a_row_not_a_crash():
    rows = bench_train(preset="tiny", seq_lens=(64, 128), batch_tokens=128, device="cpu", memory_limit=10_000, verbose=False)
    assert [r["status"][:14] for r in rows] == ["out of memory:"] * 4
    assert "GiB allowed" in rows[0]["status"]
    table = format_rows("train", rows)
    assert table.count("out of memory") == 4

    def oom(): raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
    assert run_guarded(oom) == (None, "out of memory: CUDA out of memory. Tried to allocate 12.00 GiB")
    with pytest.raises(ZeroDivisionError): run_guarded(lambda: 1 / 0)


def test_suite_sweep_reports_an_oom_size_and_keeps_going(monkeypatch, tmp_path):
    calls = []
    def fake(seq_lens, device, verbose, **kw):
        calls.append(seq_lens)
        if seq_lens == (4096,): raise torch.OutOfMemoryError("CUDA out of memory")
        return [dict(N=seq_lens[0], batch=1, full_ms=2.0, full_iqr_ms=0.1, multilevel_ms=1.0, multilevel_iqr_ms=0.1, speedup=2.0)]
    monkeypatch.setitem(SUITES, "attention", replace(SUITES["attention"], fn=fake, cpu=dict(seq_lens=(1024, 4096, 8192))))
    res = run_suite("attention", "cpu", tmp_path, verbose=False)
    assert calls == [(1024,), (4096,), (8192,)]
    assert [r.get("status", "ok")[:14] for r in res["rows"]] == ["ok", "out of memory:", "ok"]
    assert res["rows"][1]["N"] == 4096
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["rows"] == res["rows"] and saved["settings"] == dict(seq_lens=[1024, 4096, 8192])
    assert (tmp_path / "attention.png").exists()


def test_results_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    write_json_atomic(dict(rows=[1]), path)
    def interrupted(fd): raise KeyboardInterrupt  # Ctrl-C while the new file is being written
    monkeypatch.setattr(B.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt): write_json_atomic(dict(rows=[1, 2, 3]), path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == dict(rows=[1])
    assert os.listdir(tmp_path) == ["train.json"]


def test_train_suite_writes_json_with_environment(tmp_path):
    res = run_suite("train", "cpu", tmp_path, verbose=False, seq_lens=(32,), batch_tokens=64, repeats=1, warmup=0)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert {"suite", "device", "torch", "date", "settings", "rows"} <= set(saved)
    assert saved["torch"] == torch.__version__ and saved["settings"]["preset"] == "tiny"
    ours, dense = saved["rows"]
    assert (ours["model"], dense["model"]) == ("vishwamai", "dense")
    assert ours["tokens_per_s"] > 0 and ours["mfu"] > 0 and ours["vs_dense"] == pytest.approx(ours["tokens_per_s"] / dense["tokens_per_s"])
    assert ours["active_params"] > dense["active_params"]  # the router and shared projections


def test_unknown_suites_and_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown benchmark suite 'speed'"): run_suite("speed")
    with pytest.raises(ValueError, match="unknown benchmark suite 'x'"): run_suites(["train", "x"])
    with pytest.raises(ValueError, match="sequence length 0"): bench_train(seq_lens=(0,))
    with pytest.raises(ValueError, match="batch_tokens"): bench_train(batch_tokens=-1)


def test_cli_suites_match_the_library():
    from vishwamai.cli import BENCH_SUITES, bench_command as bench
    assert BENCH_SUITES == (*SUITES, "all")
    with pytest.raises(ValueError, match="unknown benchmark suite 'fast'"): bench("fast")
    r = subprocess.run([sys.executable, "-c", "from vishwamai.cli import main; main()", "bench", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown benchmark suite 'nope'" in r.stderr


def test_train_benchmark_times_the_training_loops_own_step(monkeypatch):
    T = importlib.import_module("vishwamai.train")  # the module: `vishwamai.train` is also the function
    assert B.train_step is T.train_step  # the very function `train` compiles and calls
    calls = []
    def spy(trainer, xs, ys):
        calls.append((trainer.tc.grad_clip, trainer.balancing, tuple(xs.shape)))
        return T.train_step(trainer, xs, ys)
    monkeypatch.setattr(B, "train_step", spy)
    cfg = dict(bias_update_rate=1e-2)
    rows = bench_train(preset="tiny", seq_lens=(32,), batch_tokens=64, device="cpu", precision="fp32", warmup=1, repeats=2,
                       verbose=False, **cfg)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # warm-up and timed calls, for Vishwamai and for the dense baseline; clipping on, balancing on for the MoE model only
    assert calls == [(1.0, True, (1, 2, 32))] * 3 + [(1.0, False, (1, 2, 32))] * 3


def test_benchmark_refuses_to_time_cuda_work_without_synchronizing(monkeypatch):
    from vishwamai.timing import benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="pass device="): benchmark(lambda: None)
    assert benchmark(lambda: None, device="cpu", repeats=1).median >= 0  # naming the device is the fix


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 NVL", 835e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989.4e12)])
def test_gpu_peaks_tell_the_variants_apart(monkeypatch, name, peak):
    from vishwamai.bench import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"))[0] == peak


def test_a_sweep_keeps_batch_times_length_fixed():
    from vishwamai.bench import bench_attention, bench_train
    with pytest.raises(ValueError, match="give at least 8192 tokens per step"):
        bench_attention(seq_lens=(4096, 8192), batch_tokens=4096, device="cpu")
    with pytest.raises(ValueError, match="give at least 512 tokens per step"):
        bench_train(seq_lens=(256, 512), batch_tokens=256, device="cpu")
