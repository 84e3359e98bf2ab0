"The README's promises: its Python quickstart runs, and its two commands exist."
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_python_quickstart_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python quickstart"
    monkeypatch.chdir(tmp_path)  # the quickstart saves the model into the current folder
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.logits.shape == (2, 64, 256) and out.loss.ndim == 0 and out.aux_loss > 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in next(tmp_path.iterdir()).iterdir()}
    loaded = namespace["model"]  # the model read back from that folder
    with torch.no_grad():
        assert torch.equal(loaded(namespace["input_ids"]).logits, out.logits.detach())


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("train", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no `{target}` target"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
