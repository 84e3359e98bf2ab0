"The XLA path on torch_xla's CPU device: training equals CPU training, no recompilation after warm-up, SPMD expert sharding equals unsharded, the loader covers every block once per epoch, clear errors."
import importlib.util
import json
import sys

import pytest
import torch

from vishwamai.config import VishwamaiConfig
from vishwamai.device import resolve_device, resolve_precision
from vishwamai.sharding import check_expert_sharding, group_limited, num_experts_per_device, run_on_xla_cpu

HAS_XLA = importlib.util.find_spec("torch_xla") is not None


def _need_xla():
    if not HAS_XLA:
        print("SKIP REASON: torch_xla is not installed (pip install 'vishwamai[tpu]')")
        pytest.skip("torch_xla is not installed")


# Every XLA check runs in a fresh interpreter: SPMD is process-global, and the XLA device must exist before a
# process's first backward pass.
_TRAIN = r"""
import json, tempfile
from dataclasses import replace
import torch, torch_xla
from torch.utils.data import TensorDataset
from vishwamai.config import VishwamaiConfig
from vishwamai.data import make_loaders, prepare_data
from vishwamai.train import TrainConfig, train
from vishwamai.device import device_loader, resolve_device
from vishwamai.xla import compile_count, xla_replica
dev = resolve_device("xla")
out = {"replica": list(xla_replica())}
cfg = VishwamaiConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, num_experts=4, top_k=2, max_seq_len=32, expert_dim=32,
                      expert_hidden=32, ffn_hidden=0, level_windows=(8, 4, None), moe_impl="capacity", attn_impl="xla")
data = prepare_data("stdlib", seq_len=32, tokenizer="byte", vocab_size=260, max_files=4)
tc = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2, log_every=3, save_every=3, lr=3e-3)
losses = {}
for name in ("xla", "cpu"):  # XLA first: its device must exist before the first backward pass
    with tempfile.TemporaryDirectory() as d:
        run = replace(tc, out_dir=d, device=name, precision="fp32")
        losses[name] = train(cfg, run, data=data, until=3, progress=False)["history"]["loss"]
        if name == "xla": out["compiles_warm"] = compile_count()
        h = train(cfg, run, data=data, resume=True, progress=False)["history"]
        losses[name] = h["loss"]
        if name == "xla": out["compiles_end"], out["val"] = compile_count(), h["val"]
out["losses"] = losses
blocks = TensorDataset(torch.arange(60)[:, None].repeat(1, 4), torch.arange(60)[:, None])
seen = []
for rank in range(3):
    tr, _ = make_loaders(blocks, blocks, batch_size=5, num_replicas=3, rank=rank, seed=1)
    tr.sampler.set_epoch(2)
    for x, y in device_loader(tr, dev):
        assert x.device.type == "xla" and x.shape == (5, 4)
        seen += x[:, 0].cpu().tolist()
out["seen"] = seen
print(json.dumps(out))
"""


def test_training_on_xla_matches_cpu_and_compiles_once():
    _need_xla()
    out = json.loads(run_on_xla_cpu(_TRAIN, num_devices=1).strip().splitlines()[-1])
    assert out["replica"] == [1, 0]
    xla, cpu = torch.tensor(out["losses"]["xla"]), torch.tensor(out["losses"]["cpu"])
    assert len(xla) == 6 and torch.allclose(xla, cpu, atol=1e-4), (xla, cpu)
    # steps 4-6 ran after a resume: same step, evaluation and checkpoint graphs, so nothing new was compiled
    assert out["compiles_end"] == out["compiles_warm"], out
    assert sorted(out["seen"]) == list(range(60))  # every block exactly once per epoch across the 3 replicas


_SPMD = r"""
import json, torch
from dataclasses import replace
from vishwamai.config import VishwamaiConfig
from vishwamai.sharding import compare_sharded, expert_mesh, shard_batch, shard_experts
from vishwamai.model import Vishwamai
cfg = VishwamaiConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, num_experts=8, top_k=2, max_seq_len=16, expert_dim=32,
                      expert_hidden=32, ffn_hidden=0, attention="full", moe_impl="capacity", num_expert_groups=4, top_groups=2)
out = {"ep4": compare_sharded(cfg, expert_parallel=4, batch=4, seq_len=8)}
errors = {}
for name, fn in [("mesh", lambda: expert_mesh(expert_parallel=3)), ("count", lambda: expert_mesh(num_devices=8)),
                 ("experts", lambda: shard_experts(Vishwamai(replace(cfg, num_experts=6, num_expert_groups=1, top_groups=1)), expert_mesh(4))),
                 ("batch", lambda: shard_batch(torch.zeros(3, 8, dtype=torch.long), expert_mesh(2)))]:
    try: fn(); errors[name] = None
    except ValueError as e: errors[name] = str(e)
out["errors"] = errors
print(json.dumps(out))
"""


def test_spmd_expert_sharding_equals_unsharded():
    _need_xla()
    out = json.loads(run_on_xla_cpu(_SPMD, num_devices=4).strip().splitlines()[-1])
    r = out["ep4"]
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "expert": 4}
    assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["grad"] < 1e-5, r
    assert r["w1_sharding"].startswith("{devices=[4,1,1]"), r["w1_sharding"]  # experts split 4 ways
    e = out["errors"]
    assert "mesh shape (data=1, expert=3) has 3 devices but 4 are present" in e["mesh"]
    assert "asks for 8 devices but 4 are present" in e["count"]
    assert "num_experts=6 is not divisible by the 4 devices" in e["experts"]
    assert "batch size 3 is not divisible by the data-parallel size 2" in e["batch"]


def test_device_layer_errors_and_routing_alignment():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"): resolve_device("gpu")
    with pytest.raises(ValueError, match="fp16 with loss scaling needs a CUDA device"): resolve_precision("fp16", torch.device("cpu"))
    assert num_experts_per_device(16, 4) == 4
    with pytest.raises(ValueError, match="num_experts=10 is not divisible by the 4 devices"): num_experts_per_device(10, 4)
    cfg = group_limited(VishwamaiConfig(num_experts=8, top_k=2), 4, top_groups=1)
    assert (cfg.num_expert_groups, cfg.top_groups) == (4, 1) and check_expert_sharding(cfg, 4) == 2
    with pytest.raises(ValueError, match="would span devices"): check_expert_sharding(cfg, 8)


def test_xla_without_torch_xla_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # `import torch_xla` now raises ImportError
    with pytest.raises(ValueError, match=r"needs torch_xla, which is not installed: pip install 'vishwamai\[tpu\]'"):
        resolve_device("xla")
