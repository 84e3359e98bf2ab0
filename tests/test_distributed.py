"""FSDP2 and expert parallelism over torch.distributed: two CPU processes on gloo, launched with torchrun, equal one
process; gradient clipping sees the whole model; DCP checkpoints of the shards load back exactly."""
import json
import textwrap

import pytest

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed import init_distributed, torchrun

CFG = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, num_experts=4, top_k=2, max_seq_len=16, expert_dim=32,
           expert_hidden=32, ffn_hidden=0, attention="full", num_expert_groups=2, aux_loss_weight=0.1)


@pytest.mark.parametrize("top_groups", [1, 2])  # 1: each token's rows go to one process only, so some splits are empty
def test_fsdp_equals_one_process(top_groups):
    cfg = VishwamaiConfig(**CFG, top_groups=top_groups)
    code = textwrap.dedent(f"""
        import json
        import torch.distributed as dist
        from vishwamai.config import VishwamaiConfig
        from vishwamai.distributed import check_fsdp
        cfg = VishwamaiConfig(**{cfg.__dict__!r})
        r = {{ep: check_fsdp(cfg, ep, batch_per_rank=3, seq_len=10, seed={top_groups})["ranks"] for ep in (False, True)}}
        if dist.get_rank() == 0: print(json.dumps(r))
        dist.destroy_process_group()""")
    report = json.loads(torchrun(code, nproc=2).strip().splitlines()[-1])
    for ep, ranks in report.items():
        assert [r["rank"] for r in ranks] == [0, 1]
        for r in ranks:
            assert r["backend"] == "gloo" and r["world_size"] == 2 and r["experts_here"] == (2 if ep == "true" else 4)
            # float32 sums in another order (reduce-scatter, all-reduce of squares): rounding only
            assert r["logits"] < 1e-5 and r["grad"] < 1e-5, (ep, r)
            assert abs(r["norm"] - r["ref_norm"]) < 1e-6 * r["ref_norm"], (ep, r)
        assert ranks[0]["norm"] == ranks[1]["norm"]  # one norm for the whole model, the same on every process


def test_sharded_checkpoint_round_trip(tmp_path):
    "Save after a few AdamW steps with clipping, load into a model with other weights: the same logits and optimizer state."
    cfg = VishwamaiConfig(**CFG, top_groups=2, shared_expert=True)
    code = textwrap.dedent(f"""
        import json
        import torch, torch.distributed as dist
        from vishwamai.config import VishwamaiConfig
        from vishwamai.distributed import (clip_grad_norm_, fsdp, full_state_dict, init_distributed, load_sharded,
                                           save_sharded, sharded_state_dict)
        from vishwamai.model import Vishwamai
        info, cfg = init_distributed(), VishwamaiConfig(**{cfg.__dict__!r})
        def build(seed):
            torch.manual_seed(seed)
            model = fsdp(Vishwamai(cfg), expert_parallel=True)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
        def state(model, opt):
            sd = sharded_state_dict(model, opt)
            ts = [*sd["model"].values(), *(v for st in sd["optim"]["state"].values() for v in st.values())]
            return [t.to_local() if hasattr(t, "to_local") else t for t in ts]
        ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(info.rank))
        model, opt = build(0)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            clip_grad_norm_(model, 0.1)
            opt.step(); opt.zero_grad()
        save_sharded("{tmp_path}", model, opt)
        fresh, fresh_opt = build(1)
        load_sharded("{tmp_path}", fresh, fresh_opt)
        whole = Vishwamai(cfg)
        whole.load_state_dict(full_state_dict(model))
        with torch.no_grad(): a, b, c = (m.eval()(ids).logits for m in (model, fresh, whole))
        r = dict(logits=(a - b).abs().max().item(), whole=(a - c).abs().max().item(),
                 state=[bool(torch.equal(x, y)) for x, y in zip(state(model, opt), state(fresh, fresh_opt))])
        model.train(); fresh.train()
        for m, o in ((model, opt), (fresh, fresh_opt)):  # one more step each: the same update
            m(ids, labels=ids).loss.backward(); o.step()
        r["after_step"] = (model.eval()(ids).logits - fresh.eval()(ids).logits).abs().max().item()
        ranks = [None] * info.world_size
        dist.all_gather_object(ranks, r)
        if info.rank == 0: print(json.dumps(ranks))
        dist.destroy_process_group()""")
    ranks = json.loads(torchrun(code, nproc=2).strip().splitlines()[-1])
    for r in ranks:
        assert r["logits"] == 0 and all(r["state"]) and r["after_step"] == 0, r
        assert r["whole"] < 1e-5, r  # one process, its own dispatch: rounding only
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_init_distributed_outside_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"): init_distributed()
