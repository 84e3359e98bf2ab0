"The prepared GPU check judges each goal in the right direction (the script itself runs at smoke size in CI)."
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _results(speedup, loop_ms, grouped_ms, dense_ms, vs_dense, mfu):
    ok = lambda **r: dict(status="ok", **r)
    return {
        "attention": dict(settings=dict(seq_lens=[16, 32, 64]), rows=[ok(N=n, speedup=speedup) for n in (16, 32, 64)]),
        "moe": dict(settings=dict(experts=[8, 64]), rows=[ok(experts=e, impl=i, ms=ms) for e in (8, 64)
                                                         for i, ms in (("loop", loop_ms), ("grouped", grouped_ms), ("dense", dense_ms))]),
        "train": dict(settings=dict(seq_lens=[2048, 16384]), rows=[ok(N=n, model=m, vs_dense=vs_dense, mfu=mfu)
                                                                  for n in (2048, 16384) for m in ("vishwamai", "dense")]),
    }


def test_goals_met_and_missed():
    good = gpu_check.evaluate(_results(7.0, 100.0, 4.0, 3.0, 2.0, 0.4), smoke=False)
    assert [r["met"] for r in good] == ["yes"] * len(gpu_check.GOALS)
    bad = gpu_check.evaluate(_results(1.0, 10.0, 4.0, 2.0, 0.5, 0.2), smoke=False)
    assert [r["met"] for r in bad] == ["no"] * len(gpu_check.GOALS)
    assert {r["met"] for r in gpu_check.evaluate(_results(7.0, 100.0, 4.0, 3.0, 2.0, 0.4), smoke=True)} == {"smoke size"}


def test_a_missing_row_is_reported_not_judged():
    res = _results(7.0, 100.0, 4.0, 3.0, 2.0, 0.4)
    res["attention"]["rows"][2]["status"] = "out of memory"
    rows = gpu_check.evaluate(res, smoke=False)
    assert rows[2]["measured"] is None and rows[2]["met"].startswith("not measured")
    assert "| – |" in gpu_check.markdown(rows, dict(device="GPU", torch="2.9", date="today"))
