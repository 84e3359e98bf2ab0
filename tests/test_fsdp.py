"""`train` and `vishwamai train` under torchrun: two CPU processes over gloo, the model sharded by FSDP2 (and its experts by
expert parallelism), train as one process with the whole batch would, save DCP checkpoints and resume from them exactly.

One torchrun job runs every distributed run of this file (starting one costs seconds); the tests read its report.
"""
import json
import textwrap
from dataclasses import replace

import pytest

from vishwamai.checkpoint import find_checkpoint, load_checkpoint
from vishwamai.config import VishwamaiConfig
from vishwamai.distributed import torchrun
from vishwamai.train import TrainConfig, train

# Bias balancing, no Switch balance loss: that loss multiplies two batch means (f_i * P_i), so two processes each computing
# it over their half do not give the loss of the whole batch; the loads bias balancing steps from are summed over processes.
# The router z-loss is a mean over tokens, which averages over processes like the LM loss. No dropout, no router noise.
CFG = VishwamaiConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=32,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, attention="full", num_expert_groups=2, top_groups=2,
                      shared_expert=True, aux_loss_weight=0.0, bias_update_rate=0.05)
TC = TrainConfig(tokenizer="byte", seq_len=32, batch_size=2, steps=8, warmup_steps=2, eval_every=4, eval_batches=2,
                 log_every=2, save_every=4, val_fraction=0.2, device="cpu")
# float32 sums in another order: each process averages its half and the halves are averaged, and FSDP2's reduce-scatter
# sums the gradients in another order than one backward pass over the whole batch. Measured: one float32 ulp of the loss
# (4.8e-7) over 8 steps. Summing no loads over the processes (bias balancing from each process's own) moves it by 4e-4.
TOL = 2e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for k in range(20):
        (folder / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {k}\n" for i in range(40)))
    return folder


@pytest.fixture(scope="module")
def job(corpus, tmp_path_factory):
    "The distributed runs: FSDP2, FSDP2 with expert parallelism, the latter stopped and resumed, and the command line."
    out = tmp_path_factory.mktemp("runs")
    tc = replace(TC, dataset=str(corpus))
    (out / "model.json").write_text(CFG.to_json())
    code = textwrap.dedent(f"""
        import json, sys
        from dataclasses import replace
        import torch.distributed as dist
        from vishwamai.config import VishwamaiConfig
        from vishwamai.train import TrainConfig, train
        cfg, tc = VishwamaiConfig(**{CFG.__dict__!r}), TrainConfig(**{tc.__dict__!r})
        def losses(name, **kw):
            return train(cfg, replace(tc, out_dir="{out}/" + name, **kw.pop("tc", {{}})), progress=False, **kw)["history"]["loss"]
        r = dict(fsdp=losses("fsdp"), ep=losses("ep", tc=dict(expert_parallel=True)))
        losses("resumed", tc=dict(expert_parallel=True), until=4)
        r["resumed"] = losses("resumed", tc=dict(expert_parallel=True), resume=True)
        sys.argv = ["vishwamai", "train", "--config", "{out}/model.json", "--dataset", "{corpus}", "--tokenizer", "byte",
                    "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--expert-parallel",
                    "--out", "{out}/cli"]
        from vishwamai.cli import main
        main()
        if dist.get_rank() == 0: print(json.dumps(r))
        dist.destroy_process_group()""")
    stdout = torchrun(code, nproc=2, timeout=240)
    return dict(out=out, stdout=stdout, **json.loads(stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    "One process with the whole batch: twice the blocks of each of the two processes."
    tc = replace(TC, dataset=str(corpus), batch_size=2 * TC.batch_size, out_dir=str(tmp_path_factory.mktemp("one")))
    return train(CFG, tc, progress=False)["history"]["loss"]


@pytest.mark.parametrize("variant", ["fsdp", "ep"])
def test_two_processes_train_as_one_with_the_whole_batch(job, one_process, variant):
    assert len(job[variant]) == len(one_process) == TC.steps
    diff = max(abs(a - b) for a, b in zip(job[variant], one_process))
    print(f"{variant}: largest |loss difference| over {TC.steps} steps: {diff:.2e}")
    assert diff < TOL, (variant, job[variant], one_process)


@pytest.mark.exact
def test_resuming_from_the_shards_is_exact(job):
    """Exact: both runs compute the same steps on the same two processes, one thread each, and the DCP checkpoint
    restores the shards, the optimizer state, the schedule and every process's random state bit for bit."""
    assert job["resumed"] == job["ep"]


def test_a_distributed_checkpoint_loads_in_one_process(job, corpus):
    ck = find_checkpoint(job["out"] / "ep")
    assert ck.name == "step-00000008" and sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                             "__1_0.distcp"]
    loaded = load_checkpoint(ck)  # the model gathered whole: every expert, as one process holds it
    assert loaded.state["world_size"] == 2 and len(loaded.state["rng"]) == 2
    assert loaded.model.blocks[0].moe.experts.w1.shape[0] == CFG.num_experts
    # resuming it needs as many processes: one process is refused with the command to use
    with pytest.raises(ValueError, match="saved by 2 process.*torchrun --nproc-per-node 2"):
        train(CFG, replace(TC, dataset=str(corpus), out_dir=str(job["out"] / "ep"), steps=12), resume=True, progress=False)


def test_the_command_line_under_torchrun(job):
    run = job["out"] / "cli"
    assert all((run / f).exists() for f in ("history.json", "loss.png", "metrics.jsonl"))
    assert job["stdout"].count("for 4 steps; output in") == 1 and "validation loss" in job["stdout"]
    ck = load_checkpoint(run)
    assert ck.state["step"] == 4 and (ck.path / "dcp" / ".metadata").exists()
    assert {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {1, 2, 3, 4}
