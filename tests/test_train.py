"Training: exact resumption, failures that keep what was saved, Ctrl-C, and clear errors."
import importlib
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch

from vishwamai import VishwamaiConfig
from vishwamai.data import prepare_data
from vishwamai.checkpoint import count_non_finite, find_checkpoint, load_checkpoint, save_checkpoint
from vishwamai.train import TrainConfig, TrainingDiverged, train

CFG = VishwamaiConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))
TC = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_every=4, eval_batches=2, log_every=2, save_every=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    "A folder of 20 small Python files: a corpus of 20 documents."
    folder = tmp_path_factory.mktemp("corpus")
    for k in range(20):
        (folder / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {k}\n" for i in range(40)))
    return folder


@pytest.fixture(scope="module")
def data(corpus):
    return prepare_data(str(corpus), seq_len=32, tokenizer="byte", val_fraction=0.5, seed=0)


@pytest.mark.exact
def test_resuming_follows_the_same_loss_trajectory(tmp_path, data):
    """Exact with the default threads: both runs compute the same steps on the same machine, and the CPU path sums in a
    fixed order whatever the thread count (its gathers and scatters are fixed-order operations)."""
    whole = train(CFG, replace(TC, out_dir=str(tmp_path / "a")), data=data, progress=False)["history"]
    train(CFG, replace(TC, out_dir=str(tmp_path / "b")), data=data, until=4, progress=False)
    resumed = train(CFG, replace(TC, out_dir=str(tmp_path / "b")), data=data, resume=True, progress=False)["history"]
    assert len(whole["loss"]) == 8
    assert resumed["loss"] == whole["loss"]
    assert resumed["val"] == whole["val"]


@pytest.mark.exact
def test_bias_balancing_and_accumulation_resume_exactly(tmp_path, data):
    "Exact for the same reason as above; dropout and router noise come from the random state the checkpoint restores."
    cfg, tc = replace(CFG, bias_update_rate=1e-2, dropout=0.1), replace(TC, grad_accum=2)
    whole = train(cfg, replace(tc, out_dir=str(tmp_path / "a")), data=data, progress=False)
    train(cfg, replace(tc, out_dir=str(tmp_path / "b")), data=data, until=4, progress=False)
    resumed = train(cfg, replace(tc, out_dir=str(tmp_path / "b")), data=data, resume=True, progress=False)
    assert resumed["history"]["loss"] == whole["history"]["loss"]
    bias = [b.moe.router.expert_bias for b in whole["model"].blocks]
    assert any(b.abs().sum() > 0 for b in bias), "bias balancing never moved the bias"


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    tc = replace(TC, out_dir=str(tmp_path), steps=12, save_every=2, warmup_steps=0, grad_clip=0.0)
    train(CFG, replace(tc, steps=4), data=data, progress=False)
    good = find_checkpoint(tmp_path)
    with pytest.raises(TrainingDiverged, match=str(good)):
        train(CFG, replace(tc, lr=1e30), data=data, resume=True, progress=False)
    assert find_checkpoint(tmp_path) == good
    load_checkpoint(tmp_path)


def test_weights_that_turn_non_finite_in_an_update_are_never_called_good(tmp_path, data, monkeypatch):
    T = importlib.import_module("vishwamai.train")  # the module: `vishwamai.train` is also the function
    real = T.train_step
    def poisoning(trainer, xs, ys):  # the losses of step 6 are finite, its update leaves a NaN weight
        losses = real(trainer, xs, ys)
        if trainer.sched.last_epoch == 5:
            with torch.no_grad(): next(trainer.model.parameters()).view(-1)[0] = float("nan")
        return losses
    monkeypatch.setattr(T, "train_step", poisoning)
    with pytest.raises(TrainingDiverged, match="step-00000004") as e:
        train(CFG, replace(TC, out_dir=str(tmp_path), save_every=2, eval_every=100), data=data, progress=False)
    assert "after step 6" in str(e.value)  # the update of step 6, found before its checkpoint was saved
    assert find_checkpoint(tmp_path).name == "step-00000004"
    assert count_non_finite(load_checkpoint(tmp_path).model) == 0


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, data):
    res = train(CFG, replace(TC, out_dir=str(tmp_path), steps=4), data=data, progress=False)
    good = find_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    class BrokenTokenizer:
        def save(self, path): raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 4, res["model"], BrokenTokenizer(), TC)
    assert find_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_bad_checkpoints_and_mismatched_configs_are_refused(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    train(CFG, replace(TC, out_dir=str(tmp_path), steps=4), data=data, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        train(replace(CFG, d_model=64, expert_dim=64), replace(TC, out_dir=str(tmp_path)), data=data, resume=True, progress=False)
    ck = find_checkpoint(tmp_path)
    (ck / "train_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing train_state.pt"):
        load_checkpoint(ck)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):  # a run folder resolves only to complete ones
        load_checkpoint(tmp_path)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    (ck / "train_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(ck)


@pytest.mark.parametrize("device,match", [("quantum", "unknown device"), ("cuda:7", "CUDA|cuda")])
def test_unknown_or_absent_devices_are_refused(tmp_path, data, device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7: pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match=match):
        train(CFG, replace(TC, out_dir=str(tmp_path), device=device), data=data, progress=False)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    script = textwrap.dedent(f"""
        import sys
        from vishwamai import VishwamaiConfig
        from vishwamai.data import prepare_data
        from vishwamai.train import TrainConfig, train
        cfg = VishwamaiConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                              expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))
        data = prepare_data({str(corpus)!r}, seq_len=32, tokenizer="byte", val_fraction=0.5)
        print("ready", flush=True)
        res = train(cfg, TrainConfig(steps=100000, batch_size=4, seq_len=32, save_every=100000, eval_every=100000,
                                     out_dir={str(tmp_path)!r}), data=data, progress=False)
        print("interrupted" if res["interrupted"] else "finished", res["checkpoint"], flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(3)  # let a few steps run
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]  # the library returns; the command line exits 130
    assert out.startswith("interrupted"), out
    ck = find_checkpoint(tmp_path)
    assert 0 < load_checkpoint(ck).state["step"] < 100000


def test_train_runs_the_named_training_step(tmp_path, data, monkeypatch):
    T = importlib.import_module("vishwamai.train")  # the module: `vishwamai.train` is also the function
    steps = []
    real = T.train_step
    def spy(trainer, xs, ys):
        steps.append(tuple(xs.shape))
        return real(trainer, xs, ys)
    monkeypatch.setattr(T, "train_step", spy)
    train(CFG, replace(TC, out_dir=str(tmp_path), steps=3, grad_accum=2), data=data, progress=False)
    assert steps == [(2, 4, 32)] * 3  # one call per optimizer step, with its micro-batches


def test_cuda_training_steps_are_compiled_unless_eager():
    from vishwamai.device import compile_step
    def step(): return 1
    before = torch._dynamo.config.capture_scalar_outputs
    try:
        assert compile_step(step, torch.device("cuda")) is not step  # compiled lazily: no GPU needed to wrap it
        assert torch._dynamo.config.capture_scalar_outputs  # data-dependent sizes become symbolic, not graph breaks
        assert compile_step(step, torch.device("cuda"), eager=True) is step
        assert compile_step(step, torch.device("cpu")) is step
    finally: torch._dynamo.config.capture_scalar_outputs = before


def test_expert_parallel_training_needs_xla():
    with pytest.raises(ValueError, match="TrainConfig.expert_parallel: needs device='xla'"): TrainConfig(expert_parallel=True)


def test_weight_decay_goes_by_role():
    "Matrices of matrix multiplies are decayed; LayerNorm gains and biases (the experts' stacked ones too), biases and"
    " the static fusion logits are not, whatever their number of dimensions."
    from vishwamai import Vishwamai
    from vishwamai.train import decayed_parameters, make_optimizer
    cfg = VishwamaiConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, num_experts=2, top_k=1, expert_dim=16,
                          expert_hidden=16, ffn_hidden=16, max_seq_len=32, shared_expert=True, fusion="static")
    model = Vishwamai(cfg)
    block = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight", "moe.router.weight",
             "moe.experts.w1", "moe.experts.w2", "moe.experts.w_in.weight", "moe.experts.w_out.weight",
             "moe.experts.shared.w1", "moe.experts.shared.w2", "ffn.up.weight", "ffn.down.weight"]
    assert decayed_parameters(model) == ["embed.weight", *(f"blocks.0.{n}" for n in block)]
    groups = make_optimizer(model, TrainConfig()).param_groups
    assert [g["weight_decay"] for g in groups] == [TrainConfig().weight_decay, 0.0]
    undecayed = {id(p) for p in groups[1]["params"]}
    named = dict(model.named_parameters())
    for n in ("blocks.0.moe.experts.norm_weight", "blocks.0.attn.fusion.logits", "blocks.0.attn_norm.weight"):
        assert id(named[n]) in undecayed, n


def _log(run) -> list:
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_speed(records) -> list:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.exact
def test_metrics_log_is_written_as_the_run_goes_and_a_resume_rewrites_the_steps_it_repeats(tmp_path, data):
    """Exact for the reasons `test_resuming_follows_the_same_loss_trajectory` is: the same steps on the same machine."""
    whole = train(CFG, replace(TC, out_dir=str(tmp_path / "a")), data=data, progress=False)["history"]
    log = _log(tmp_path / "a")
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [2, 4, 6, 8] and [r["step"] for r in log if "val_loss" in r] == [4, 8]
    # the log's means are taken in float32, the history's floats here in float64
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx([sum(whole["loss"][s - 2:s]) / 2 for s in steps], rel=1e-6)
    for r in (r for r in log if "loss" in r):
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and len(r["moe"]) == CFG.n_layers
        assert abs(sum(r["moe"][0]["load"]) - 1) < 1e-6 and 0 <= r["moe"][0]["dropped"] <= 1
    # a run cut after step 6, its checkpoint at step 4: the resumed run drops the lines of steps 5-6 and logs them again
    b = tmp_path / "b"
    train(CFG, replace(TC, out_dir=str(b), save_every=4), data=data, until=4, progress=False)
    with open(b / "metrics.jsonl", "a") as f: f.write('{"step": 6, "loss": 0.0}\n{"step": 8, "lo')  # then a crash mid-line
    train(CFG, replace(TC, out_dir=str(b)), data=data, resume=True, progress=False)
    assert _without_speed(_log(b)) == _without_speed(log)


def test_a_folder_with_only_a_metrics_log_holds_a_run(tmp_path, data):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 5.0}\n')
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        train(CFG, replace(TC, out_dir=str(tmp_path)), data=data, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2, "loss": 5.0}\n'


def test_tensorboard_events_hold_the_logged_values(tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(CFG, replace(TC, out_dir=str(tmp_path), tensorboard=True), data=data, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    log = _log(tmp_path)
    for key in ("loss", "grad_norm", "val_loss"):
        want = [(r["step"], r[key]) for r in log if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(g - w) <= 1e-6 * abs(w) for (_, g), (_, w) in zip(got, want))  # events store float32
    assert len(events.Scalars("moe/0/load/3")) == 4
