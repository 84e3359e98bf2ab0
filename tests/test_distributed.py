"Expert parallelism over torch.distributed: two CPU processes on gloo, launched with torchrun, equal one process."
import json
import os

import pytest

from vishwamai.config import VishwamaiConfig
from vishwamai.distributed import init_distributed, torchrun


@pytest.mark.parametrize("top_groups", [1, 2])  # 1: each token's rows go to one process only, so some splits are empty
def test_expert_parallel_equals_one_process(top_groups):
    cfg = VishwamaiConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, num_experts=4, top_k=2, max_seq_len=16,
                          expert_dim=32, expert_hidden=32, ffn_hidden=0, attention="full", num_expert_groups=2,
                          top_groups=top_groups, aux_loss_weight=0.1)
    code = ("import json\nfrom vishwamai.config import VishwamaiConfig\nfrom vishwamai.distributed import check_expert_parallel\n"
            f"r = check_expert_parallel(VishwamaiConfig(**{cfg.__dict__!r}), batch_per_rank=3, seq_len=10, seed={top_groups})\n"
            "if r['ranks'][0]['rank'] == 0: print(json.dumps(r))")
    report = json.loads(torchrun(code, nproc=2).strip().splitlines()[-1])
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        assert r["backend"] == "gloo" and r["world_size"] == 2 and r["experts_here"] == 2
        assert r["logits"] < 1e-5 and r["grad"] < 1e-5, r


def test_init_distributed_outside_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"): init_distributed()
