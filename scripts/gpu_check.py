"""The prepared GPU check: every GPU goal of the book measured in one run, written as JSON and a Markdown table.

    make gpu-check           # on one CUDA GPU (H100/H200): the goal sizes
    make gpu-check SMOKE=1   # anywhere, on the CPU at toy sizes, in about a minute: CI runs it so the script cannot rot

Everything lands in one folder (default runs/gpu-check): each suite's JSON, the chapters' `#| gpu` test log, and
goals.json / goals.md with the columns goal, measured and met. At smoke size the goals are not evaluated.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from vishwamai.bench import run_suite, write_json_atomic

GPU_CHAPTERS = ["nbs/13_moe.ipynb", "nbs/23_attention.ipynb", "nbs/50_bench.ipynb"]
GOAL_SIZE = {"moe": {}, "attention": {}, "train": {}}  # each suite's own GPU setting is the goal setting
SMOKE_SIZE = {
    "moe": dict(experts=(4, 8), tokens=256, d_model=64, hidden=128, warmup=1, repeats=2),
    "attention": dict(seq_lens=(128, 256, 512), batch_tokens=1024, n_heads=2, head_dim=16, windows=(32, 16, None),
                      warmup=1, repeats=2),
    "train": dict(preset="tiny", seq_lens=(64, 128), batch_tokens=256, warmup=1, repeats=2),
}


def _pick(rows, **match):
    "The one row whose fields equal `match`."
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("status", "ok") == "ok"]
    if len(found) != 1: raise LookupError(f"no single measured row with {match}")
    return found[0]


def _sweep(result, key, i):
    "The i-th value of a suite's swept setting (so a goal names a position, valid at goal and smoke sizes)."
    return result["settings"][key][i]


# (suite, goal, how to read the measurement from the suite's result, comparison, target)
GOALS = [
    *[("attention", f"multi-level vs flash SDPA, fwd+bwd, speed-up at the {nth} length (16k, 32k, 64k at goal size)",
       lambda r, i=i: _pick(r["rows"], N=_sweep(r, "seq_lens", i))["speedup"], ">=", target)
      for i, (nth, target) in enumerate((("first", 1.5), ("second", 3.0), ("third", 6.0)))],
    ("moe", "grouped vs per-expert loop at the most experts (64 at goal size), speed-up",
     lambda r: _pick(r["rows"], experts=max(r["settings"]["experts"]), impl="loop")["ms"]
     / _pick(r["rows"], experts=max(r["settings"]["experts"]), impl="grouped")["ms"], ">=", 20.0),
    *[("moe", f"grouped time / dense FFN time (same active FLOPs), {which} experts",
       lambda r, f=f: _pick(r["rows"], experts=f(r["settings"]["experts"]), impl="grouped")["ms"]
       / _pick(r["rows"], experts=f(r["settings"]["experts"]), impl="dense")["ms"], "<=", 1.5)
      for which, f in (("fewest", min), ("most", max))],
    *[("train", f"Vishwamai / dense training tokens/s at the {nth} length ({size} at goal size)",
       lambda r, i=i: _pick(r["rows"], N=_sweep(r, "seq_lens", i), model="vishwamai")["vs_dense"], ">=", target)
      for i, nth, size, target in ((0, "first", "2k", 0.8), (-1, "last", "16k", 1.5))],
    ("train", "dense model MFU at the first length (2k at goal size)",
     lambda r: _pick(r["rows"], N=_sweep(r, "seq_lens", 0), model="dense")["mfu"], ">=", 0.35),
]


def evaluate(results: dict, smoke: bool) -> list:
    "One row per goal: what was measured and whether it meets the target (not judged at smoke size)."
    rows = []
    for suite, goal, read, op, target in GOALS:
        try: measured = read(results[suite])
        except (KeyError, LookupError, TypeError) as e: measured, met = None, f"not measured ({e})"
        else: met = "smoke size" if smoke else ("yes" if (measured >= target if op == ">=" else measured <= target) else "no")
        rows.append(dict(suite=suite, goal=f"{goal} {op} {target:g}", measured=measured, met=met))
    return rows


def markdown(rows: list, env: dict) -> str:
    "The goals as a Markdown table, headed by the card, torch version and date."
    lines = [f"GPU goals | {env['device']} | torch {env['torch']} | {env['date']}", "", "| goal | measured | met |", "|---|---|---|"]
    for r in rows:
        measured = "–" if r["measured"] is None else f"{r['measured']:.3g}"
        lines.append(f"| {r['goal']} | {measured} | {r['met']} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks that the script runs, judges nothing")
    p.add_argument("--out", default="runs/gpu-check", help="folder for every result")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine, or with --smoke (make gpu-check SMOKE=1)")
    device, out, start = torch.device("cpu" if args.smoke else "cuda"), Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke:  # the chapters' GPU cells first: they fail fast if a kernel path is broken
        with open(out / "nbdev-test-gpu.log", "w") as log:
            nbdev_test = Path(sys.executable).with_name("nbdev-test")
            subprocess.run([str(nbdev_test), "--flags", "gpu", *GPU_CHAPTERS], stdout=log, stderr=log)
    sizes = SMOKE_SIZE if args.smoke else GOAL_SIZE
    results = {name: run_suite(name, device, out, **sizes[name]) for name in ("moe", "attention", "train")}
    rows = evaluate(results, args.smoke)
    env = {k: results["moe"][k] for k in ("device", "torch", "date")}
    write_json_atomic(dict(**env, smoke=args.smoke, seconds=time.time() - start, goals=rows), out / "goals.json")
    (out / "goals.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    print(f"gpu_check: {time.time() - start:.0f} s; results in {out}/")


if __name__ == "__main__":
    main()
