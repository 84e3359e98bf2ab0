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
from vishwamai.data import batch_indices, get_batch, prepare_data
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
for rank in range(3):  # epoch 2: steps 8..11 of 4 steps per epoch
    batches = (get_batch(blocks, batch_indices(s, 60, 5, seed=1, num_replicas=3, rank=rank)) for s in range(8, 12))
    for x, y in device_loader(batches, dev):
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


_ENTRY_POINTS = r"""
import json, torch
from vishwamai.device import (autocast, generator, manual_seed, resolve_device, resolve_precision, rng_state, set_rng_state,
                              xla_device)
from vishwamai.timing import device_name, environment
out = {}
for name in ("xla", torch.device("xla")):
    key = repr(name)
    dev = resolve_device(name)
    manual_seed(5, name); a = torch.rand(4, device=dev).cpu()
    manual_seed(5, name); b = torch.rand(4, device=dev).cpu()
    saved = rng_state(name); c = torch.rand(4, device=dev).cpu()
    set_rng_state(saved, name); d = torch.rand(4, device=dev).cpu()
    with autocast(name, "bf16"): dtype = str((torch.ones(2, 2, device=dev) @ torch.ones(2, 2, device=dev)).dtype)
    draw = torch.randint(0, 100, (4,), generator=generator(3, name)).to(dev)
    out[key] = dict(device=str(dev), index=str(xla_device(name)), seeded=torch.equal(a, b), restored=torch.equal(c, d),
                    autocast=dtype, precision=resolve_precision("auto", name), environment=environment(name),
                    name=device_name(name), draw=draw.cpu().tolist(),
                    want=torch.randint(0, 100, (4,), generator=torch.Generator().manual_seed(3)).tolist())
print(json.dumps(out))
"""


def test_every_entry_point_accepts_a_bare_xla_device():
    "`'xla'` and `torch.device('xla')` (no index, which torch_xla's own calls reject) work in every device entry point."
    _need_xla()
    out = json.loads(run_on_xla_cpu(_ENTRY_POINTS, num_devices=1).strip().splitlines()[-1])
    assert set(out) == {"'xla'", "device(type='xla')"}
    for r in out.values():
        assert r["device"] == r["index"] == "xla:0", r
        assert r["seeded"] and r["restored"], r
        assert (r["autocast"], r["precision"]) == ("torch.bfloat16", "bf16"), r
        assert r["name"] == r["environment"]["device"] == "XLA CPU" and r["environment"]["torch_xla"], r
        assert r["draw"] == r["want"], r  # a host generator: the same draws as the CPU's, moved to the device


_SPMD_TRAIN = r"""
import json, sys, tempfile
from dataclasses import replace
import torch, torch_xla
import vishwamai.train
from vishwamai.config import VishwamaiConfig
from vishwamai.data import prepare_data
from vishwamai.xla import compile_count
T = sys.modules["vishwamai.train"]  # the module (the package exports the function `train` under the same name)
counts, train_step = [], T.train_step
def counted_step(t, xs, ys):
    if t.device.type == "xla": counts.append(compile_count())
    return train_step(t, xs, ys)
T.train_step = counted_step
cfg = VishwamaiConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=2, num_experts=8, top_k=2, num_expert_groups=4, top_groups=2,
                      max_seq_len=32, expert_dim=32, expert_hidden=32, ffn_hidden=0, level_windows=(8, 4, None), moe_impl="capacity",
                      attn_impl="xla")
data = prepare_data("stdlib", seq_len=32, tokenizer="byte", vocab_size=260, max_files=4)
tc = T.TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2, log_every=3, save_every=6,
                   lr=3e-3, precision="fp32")
res = {}
for name in ("xla", "cpu"):  # XLA first: SPMD and its device must exist before the first backward pass
    with tempfile.TemporaryDirectory() as d:
        res[name] = T.train(cfg, replace(tc, out_dir=d, device=name, expert_parallel=name == "xla"), data=data, progress=False)
ex = next(m for m in res["xla"]["model"].modules() if type(m).__name__ == "Experts")
out = dict(w1_sharding=torch_xla._XLAC._get_xla_sharding_spec(ex.w1), counts=counts)
out["losses"] = {k: r["history"]["loss"] for k, r in res.items()}
out["val"] = {k: [v for _, v in r["history"]["val"]] for k, r in res.items()}
diffs = {n: (p.detach().cpu() - q.detach()).abs().max().item()
         for (n, p), q in zip(res["xla"]["model"].named_parameters(), res["cpu"]["model"].parameters())}
out["weight_diff"], out["worst_weight"] = max(diffs.values()), max(diffs, key=diffs.get)
print(json.dumps(out))
"""


def test_training_with_sharded_experts_equals_unsharded():
    """`train` with `expert_parallel=True` splits the experts over 4 virtual XLA CPU devices (SPMD) and gives the losses
    and weights of unsharded training on the CPU, compiling no new step after warm-up."""
    _need_xla()
    out = json.loads(run_on_xla_cpu(_SPMD_TRAIN, num_devices=4).strip().splitlines()[-1])
    assert out["w1_sharding"].startswith("{devices=[4,1,1]"), out  # each device holds 2 of the 8 experts
    xla, cpu = torch.tensor(out["losses"]["xla"]), torch.tensor(out["losses"]["cpu"])
    # float32 sums taken in another order across the shards: rounding only (measured: 1e-6), amplified a little by AdamW
    assert len(xla) == 6 and torch.allclose(xla, cpu, atol=1e-4), (xla, cpu)
    assert torch.allclose(torch.tensor(out["val"]["xla"]), torch.tensor(out["val"]["cpu"]), atol=1e-4), out["val"]
    assert out["weight_diff"] < 1e-4, out  # after 6 AdamW steps at lr 3e-3
    warm = out["counts"][3]
    assert out["counts"][3:] == [warm] * 3, out["counts"]  # steps 4-6 reuse the compiled step (the eval at step 3 included)


def test_pallas_flash_only_where_it_imports_and_fits(monkeypatch):
    "Without JAX the attention keeps SDPA whatever the shape; the shape rule follows the kernel's 512/1024 blocks."
    from vishwamai.xla import pallas_available, pallas_flash_fits, use_pallas_flash
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` raises ImportError, as on an install without the pallas extra
    pallas_available.cache_clear()
    try:
        assert not pallas_available()
        assert not use_pallas_flash(4096, 128, on_tpu=True)
    finally: pallas_available.cache_clear()
    assert [pallas_flash_fits(n, 64) for n in (512, 1024, 1536, 2048)] == [False, True, False, True]
    assert not pallas_flash_fits(2048, 32)


_PALLAS_PRESENT = r"""
import json, sys, types
from vishwamai.xla import pallas_available, use_pallas_flash
# a stand-in for JAX's Pallas flash-attention module: what pallas_available imports, nothing more
names = ["jax", "jax.experimental", "jax.experimental.pallas", "jax.experimental.pallas.ops", "jax.experimental.pallas.ops.tpu",
         "jax.experimental.pallas.ops.tpu.flash_attention"]
for n in names:
    m = types.ModuleType(n); m.__path__ = []; m.__spec__ = __import__("importlib.machinery").machinery.ModuleSpec(n, None)
    sys.modules[n] = m
sys.modules[names[-1]]._flash_attention_impl = lambda *a: None
print(json.dumps(dict(available=pallas_available(), tpu=use_pallas_flash(2048, 128, on_tpu=True),
                      short=use_pallas_flash(512, 128, on_tpu=True), cpu=use_pallas_flash(2048, 128, on_tpu=False),
                      dropout=use_pallas_flash(2048, 128, on_tpu=True, dropout_p=0.1))))
"""


def test_pallas_flash_chosen_when_the_kernel_imports():
    "With the kernel importable, Pallas is chosen on a TPU for long, lane-filling shapes, and nowhere else."
    _need_xla()
    out = json.loads(run_on_xla_cpu(_PALLAS_PRESENT, num_devices=1).strip().splitlines()[-1])
    assert out == dict(available=True, tpu=True, short=False, cpu=False, dropout=False), out


_BENCH = r"""
import json
import torch
from vishwamai.bench import run_suite
from vishwamai.config import VishwamaiConfig
from vishwamai.experts import Experts
res = run_suite("moe", "xla", verbose=False, experts=(4,), tokens=64, d_model=32, hidden=64, warmup=1, repeats=1)
try:
    ex = Experts(VishwamaiConfig(d_model=32, num_experts=4, top_k=2)).to("xla:0")
    ex(torch.randn(8, 32, device="xla:0"), torch.zeros(8, 2, dtype=torch.long, device="xla:0"), torch.ones(8, 2, device="xla:0"), "grouped")
    refused = ""
except ValueError as e: refused = str(e)
print(json.dumps(dict(rows={r["impl"]: r.get("status", "ok") for r in res["rows"]}, device=res["device"], refused=refused)))
"""


def test_the_moe_benchmark_runs_on_xla_and_grouped_is_refused_clearly():
    "`vishwamai bench moe --device xla`: the static dispatches run; the grouped one (routing-dependent shapes, which"
    " make torch_xla abort the process) is reported, not run, and refused with a one-line error when asked for."
    _need_xla()
    out = json.loads(run_on_xla_cpu(_BENCH, num_devices=1).strip().splitlines()[-1])
    assert out["rows"] == {"loop": "ok", "grouped": "not on XLA: shapes depend on the routing", "capacity": "ok", "dense": "ok"}
    assert out["device"] == "XLA CPU" and "use impl='capacity'" in out["refused"]
