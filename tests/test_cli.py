"The command line as a user meets it: interruptions, kills mid-save, two runs at once, earlier runs, divergence, a full disk."
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vishwamai import VishwamaiConfig
from vishwamai.checkpoint import count_non_finite, find_checkpoint, load_checkpoint
from vishwamai.model import Vishwamai

CFG = VishwamaiConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=4, num_experts=4, top_k=2, max_seq_len=64,
                      expert_dim=32, expert_hidden=32, ffn_hidden=32, level_windows=(8, 4, None))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    "A corpus of 20 small Python files and a tiny model config: the arguments of a run that takes seconds."
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for k in range(20):
        (corpus / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {k}\n" for i in range(40)))
    (root / "tiny.json").write_text(CFG.to_json())
    return ["--config", str(root / "tiny.json"), "--dataset", str(corpus), "--tokenizer", "byte", "--batch-size", "2",
            "--seq-len", "32", "--device", "cpu"]


def command(*args) -> list:
    return [sys.executable, "-c", "from vishwamai.cli import main; main()", *args]


def vishwamai(*args, timeout=120):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_line_error(r, name="train") -> str:
    "The error line of a failed command, checking that it failed in one line and without a traceback."
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vishwamai {name}: error: "), r.stderr[-2000:]
    return last


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


class Training:
    "A `vishwamai train` in the background, with its stderr read as it comes (the progress bar shows the steps)."
    def __init__(self, *args):
        self.proc = subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.err = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read(1), ""): self.err += chunk

    def wait_for_step(self, n: int, timeout: float = 90):
        "Wait until the progress bar has passed step `n`: the loop, and its signal handlers, are running."
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = [int(m) for m in re.findall(r"(\d+)/\d+ \[", self.err)]
            if done and max(done) >= n: return
            assert self.proc.poll() is None, self.err[-2000:]
            time.sleep(0.1)
        raise TimeoutError(self.err[-2000:])

    def finish(self, timeout: float = 60):
        out = self.proc.stdout.read()
        self.proc.wait(timeout)
        self.reader.join(5)
        return self.proc.returncode, out, self.err


def _mount_tmpfs(where: Path, size: str, *options: str):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): needs root")


def test_sigterm_saves_says_how_to_resume_and_the_folder_takes_one_run(setup, tmp_path):
    out = tmp_path / "run"
    args = [*setup, "--steps", "100000", "--save-every", "100000", "--out", str(out)]
    run = Training("train", *args)
    run.wait_for_step(2)
    second = vishwamai("train", *setup, "--steps", "4", "--out", str(out), "--resume")
    assert "another run is writing to" in one_line_error(second)
    run.proc.send_signal(signal.SIGTERM)
    code, stdout, err = run.finish()
    assert code == 143, err[-2000:]
    assert "interrupted by SIGTERM" in stdout
    ck = find_checkpoint(out)
    step = load_checkpoint(ck).state["step"]
    assert 2 <= step < 100000
    assert f"checkpoint {ck}: step {step}, validation loss" in stdout  # the summary gives the saved checkpoint's loss
    resume = re.search(r"resume with: (.*)", stdout).group(1)
    assert resume.startswith("vishwamai train ") and resume.endswith(" --resume")
    finish = vishwamai(*shlex.split(resume)[1:], "--steps", str(step + 2))  # the printed command, two steps further
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert load_checkpoint(out).state["step"] == step + 2


def test_kill_9_during_saves_then_resume(setup, tmp_path):
    out = tmp_path / "run"
    run = Training("train", *setup, "--steps", "100000", "--save-every", "1", "--out", str(out))
    run.wait_for_step(3)
    time.sleep(0.37)  # an arbitrary moment: with a save after every step, most likely inside one
    run.proc.kill()
    run.finish()
    stale = out / "checkpoints" / ".tmp-step-99999999-1"  # as a save killed earlier leaves it, whatever this kill hit
    stale.mkdir(exist_ok=True)
    step = load_checkpoint(out).state["step"]  # the latest complete checkpoint loads
    r = vishwamai("train", *setup, "--steps", str(step + 1), "--save-every", "1", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out).state["step"] == step + 1
    assert not list((out / "checkpoints").glob(".tmp-*")), "the next start removes what crashed saves left"


def test_an_earlier_run_is_never_replaced_silently(setup, tmp_path):
    out = tmp_path / "run"
    r = vishwamai("train", *setup, "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    before = digests(out)
    r = vishwamai("train", *setup, "--steps", "3", "--out", str(out))
    assert "holds an earlier run" in one_line_error(r) and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert digests(out) == before, "a refused run changes nothing"
    r = vishwamai("train", *setup, "--steps", "3", "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000003"]


def test_output_folder_problems_are_found_before_training(setup, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    r = vishwamai("train", *setup, "--steps", "2", "--out", str(tmp_path / "a_file"))
    assert "cannot write to the output folder" in one_line_error(r) and "a file is in the way" in r.stderr
    assert "step/s" not in r.stderr  # found before the first step
    _mount_tmpfs(tmp_path / "read_only", "1m", "ro")
    try:
        r = vishwamai("train", *setup, "--steps", "2", "--out", str(tmp_path / "read_only" / "run"))
        assert "Read-only file system" in one_line_error(r) and "step/s" not in r.stderr
    finally: subprocess.run(["umount", str(tmp_path / "read_only")])


def test_a_diverging_run_names_a_finite_checkpoint_or_none(setup, tmp_path):
    out = tmp_path / "run"
    r = vishwamai("train", *setup, "--steps", "6", "--lr", "1e30", "--save-every", "1", "--out", str(out))
    line = one_line_error(r)
    assert "training diverged" in line and "no checkpoint was saved yet" in line, line
    r = vishwamai("train", *setup, "--steps", "2", "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    r = vishwamai("train", *setup, "--steps", "8", "--lr", "1e30", "--save-every", "1", "--out", str(out), "--resume")
    line = one_line_error(r)
    named = Path(re.search(r"the last good checkpoint is (\S+):", line).group(1))
    assert count_non_finite(load_checkpoint(named).model) == 0  # load_checkpoint refuses non-finite weights, too
    assert "TrainConfig.lr: must be finite" in one_line_error(vishwamai("train", *setup, "--lr", "inf", "--out", str(out)))


def test_generate_refuses_damaged_and_non_finite_checkpoints(setup, tmp_path):
    from safetensors.torch import save_model
    out = tmp_path / "run"
    assert vishwamai("train", *setup, "--steps", "2", "--out", str(out)).returncode == 0
    ck = find_checkpoint(out)
    model = load_checkpoint(ck).model
    with torch.no_grad(): next(model.parameters()).view(-1)[:3] = float("nan")
    save_model(model, str(ck / "model.safetensors"))
    assert "3 non-finite weights" in one_line_error(vishwamai("generate", "--checkpoint", str(out)), "generate")
    (ck / "train_state.pt").write_bytes(os.urandom(512))
    shutil.copy(ck / "config.json", tmp_path / "config.json")
    (ck / "config.json").write_bytes(os.urandom(64))
    line = one_line_error(vishwamai("generate", "--checkpoint", str(ck)), "generate")
    assert str(ck / "config.json") in line and "not valid JSON" in line
    shutil.copy(tmp_path / "config.json", ck / "config.json")
    save_model(Vishwamai(CFG), str(ck / "model.safetensors"))
    line = one_line_error(vishwamai("generate", "--checkpoint", str(ck)), "generate")
    assert "train_state.pt" in line and "weights_only" not in line


def test_a_full_disk_at_a_later_save_keeps_the_earlier_checkpoint(setup, tmp_path):
    probe = tmp_path / "probe"
    assert vishwamai("train", *setup, "--steps", "1", "--out", str(probe)).returncode == 0
    size = sum(p.stat().st_size for p in find_checkpoint(probe).iterdir())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, str(size * 3 // 2))  # room for one checkpoint, not two
    try:
        r = vishwamai("train", *setup, "--steps", "4", "--save-every", "1", "--out", str(disk / "run"))
        line = one_line_error(r)
        assert "could not save the checkpoint of step 2" in line and "the last checkpoint is" in line, line
        assert load_checkpoint(disk / "run").state["step"] == 1
        assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))
    finally: subprocess.run(["umount", str(disk)])
