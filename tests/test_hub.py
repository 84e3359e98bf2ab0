"Saving, loading and sharing: save_pretrained, from_pretrained and push_to_hub, offline, on local folders."
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from tokenizers import Tokenizer

from vishwamai import Vishwamai, VishwamaiConfig
from vishwamai.checkpoint import save_checkpoint
from vishwamai.data import EOT, BPETokenizer, ByteTokenizer, load_tokenizer
from vishwamai.hub import INSTALL_HINT, byte_level_tokenizer
from vishwamai.train import TrainConfig

TEXTS = ["", "x", "déjà vu ✓ 🚀", "a\r\nb\tc   d\n\n", "    def f(self):\n        return {'k': [1, 2]}\n",
         "".join(map(chr, range(256))), bytes(range(256)).decode("utf-8", errors="replace")]


def tiny(tie=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = VishwamaiConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, num_experts=4, top_k=2,
                          max_seq_len=64, tie_embeddings=tie, **kw)
    return Vishwamai(cfg).eval()


def logits(model, seed=1):
    x = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): return model(x).logits


def one_line_error(exc, f):
    with pytest.raises(exc) as e: f()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.exact
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits_and_keeps_ties(tmp_path, tie):
    "Exact: the same weights run through the same code on the same machine."
    model = tiny(tie)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Vishwamai.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.exact
def test_training_checkpoint_run_folder_and_weights_only_export_load(tmp_path):
    "Exact: the same weights run through the same code on the same machine."
    model = tiny()
    run = tmp_path / "run"
    save_checkpoint(run, 3, tiny(seed=9), ByteTokenizer(), TrainConfig())
    ckpt = save_checkpoint(run, 5, model, ByteTokenizer(), TrainConfig())  # the latest
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"): (export / name).write_bytes((ckpt / name).read_bytes())
    for where in (ckpt, run, str(run), export):
        loaded = Vishwamai.from_pretrained(where)
        assert loaded.lm_head.weight is loaded.embed.weight
        assert torch.equal(logits(loaded), logits(model)), where


def test_bad_input_fails_in_one_line_naming_cause_and_fix(tmp_path):
    model = tiny()
    good = model.save_pretrained(tmp_path / "good")
    assert "no folder" in one_line_error(FileNotFoundError, lambda: Vishwamai.from_pretrained(tmp_path / "nowhere"))
    assert "no config.json" in one_line_error(FileNotFoundError, lambda: Vishwamai.from_pretrained(tmp_path))
    assert "is a file" in one_line_error(NotADirectoryError, lambda: Vishwamai.from_pretrained(good / "config.json"))

    def variant(name, config=None, weights=None):
        d = tmp_path / name
        d.mkdir()
        if config is not None: (d / "config.json").write_text(config)
        if weights is not None: (d / "model.safetensors").write_bytes(weights)
        return d

    cfg_text, weights = (good / "config.json").read_text(), (good / "model.safetensors").read_bytes()
    msg = one_line_error(FileNotFoundError, lambda: Vishwamai.from_pretrained(variant("no-weights", cfg_text)))
    assert "no model.safetensors" in msg and "save_pretrained" in msg
    for cut in (weights[:-8], weights[:20], b"not safetensors at all"):
        d = variant(f"cut{len(cut)}", cfg_text, cut)
        assert "truncated or corrupt" in one_line_error(ValueError, lambda: Vishwamai.from_pretrained(d))
    wider = model.cfg.to_dict() | {"d_model": 64}
    msg = one_line_error(ValueError, lambda: Vishwamai.from_pretrained(variant("wider", json.dumps(wider), weights)))
    assert "does not fit its config.json" in msg and "(32, 32) vs (64, 64)" in msg
    deeper = model.cfg.to_dict() | {"n_layers": 3}
    msg = one_line_error(ValueError, lambda: Vishwamai.from_pretrained(variant("deeper", json.dumps(deeper), weights)))
    assert "blocks.2." in msg and "missing" in msg
    foreign = json.dumps({"model_type": "gpt2", "n_embd": 768})
    msg = one_line_error(ValueError, lambda: Vishwamai.from_pretrained(variant("foreign", foreign, weights)))
    assert "not a valid Vishwamai config" in msg and "model_type" in msg


def test_a_failed_save_leaves_the_saved_model_untouched(tmp_path, monkeypatch):
    import safetensors.torch
    old = tiny(seed=0)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = safetensors.torch.save_model

    def fail_half_way(model, filename, **kw):
        real(model, filename, **kw)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", fail_half_way)
    with pytest.raises(OSError, match="disk full"): tiny(seed=1).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary folder left either
    monkeypatch.undo()
    assert torch.equal(logits(Vishwamai.from_pretrained(tmp_path)), logits(old))


def test_missing_huggingface_hub_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # how Python marks a module that cannot be imported
    model = tiny()
    assert INSTALL_HINT in one_line_error(ImportError, lambda: model.push_to_hub("someone/tiny"))
    assert INSTALL_HINT in one_line_error(ImportError, lambda: Vishwamai.from_pretrained("someone/tiny"))
    model.save_pretrained(tmp_path)  # a local folder needs no huggingface_hub
    Vishwamai.from_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert INSTALL_HINT in one_line_error(ImportError, lambda: model.save_pretrained(tmp_path / "t", ByteTokenizer()))


def test_a_hub_repository_is_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    model = tiny()
    model.save_pretrained(tmp_path, ByteTokenizer())
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = Vishwamai.from_pretrained("someone/tiny", revision="v1", local_files_only=True)
    assert torch.equal(logits(loaded), logits(model))
    (repo_id, kw), = calls
    assert repo_id == "someone/tiny" and kw["revision"] == "v1" and kw["local_files_only"] is True
    assert {"config.json", "model.safetensors"} <= set(kw["allow_patterns"])

    def offline(repo_id, **kw): raise OSError("Cannot reach the Hub.\nCheck your connection.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    msg = one_line_error(FileNotFoundError, lambda: Vishwamai.from_pretrained("someone/tiny"))
    assert "someone/tiny" in msg and "Cannot reach the Hub." in msg


def test_push_to_hub_creates_the_repo_and_uploads_the_saved_folder(monkeypatch):
    model, tok = tiny(), ByteTokenizer()
    seen = {}

    class Api:
        def __init__(self, token=None): seen["token"] = token

        def create_repo(self, repo_id, **kw):
            seen["create_repo"] = (repo_id, kw)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kw):
            folder = Path(folder_path)
            seen["upload_folder"] = (repo_id, sorted(p.name for p in folder.iterdir()), kw)
            seen["same logits"] = torch.equal(logits(Vishwamai.from_pretrained(folder)), logits(model))
            seen["same ids"] = all(load_tokenizer(folder).encode(t) == tok.encode(t) for t in TEXTS)
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert model.push_to_hub("someone/tiny", tok, private=True, token="hf_x", branch="dev") == "commit-info"
    assert seen["token"] == "hf_x"
    assert seen["create_repo"] == ("someone/tiny", {"private": True, "exist_ok": True})
    repo_id, files, kw = seen["upload_folder"]
    assert repo_id == "someone/tiny" and kw["revision"] == "dev"
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert seen["same logits"] and seen["same ids"]


def test_the_byte_tokenizer_has_a_tokenizers_twin_with_the_same_ids():
    twin, byte = byte_level_tokenizer(), ByteTokenizer()
    rng = torch.Generator().manual_seed(0)
    noise = [bytes(torch.randint(0, 256, (200,), generator=rng).tolist()).decode("utf-8", errors="replace")
             for _ in range(20)]
    for text in TEXTS + noise:
        assert twin.encode(text).ids == byte.encode(text)
        assert twin.decode(twin.encode(text).ids) == byte.decode(byte.encode(text)) == text
    assert (twin.get_vocab_size(), twin.token_to_id(EOT)) == (byte.vocab_size, byte.eot_id)
    assert twin.decode([104, 105, 256], skip_special_tokens=False) == byte.decode([104, 105, 256]) == "hi" + EOT


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_saved_tokenizer_is_the_tokenizers_format_transformers_reads(tmp_path, kind):
    tok = ByteTokenizer() if kind == "byte" else BPETokenizer.train(
        ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20, vocab_size=300)
    tiny().save_pretrained(tmp_path, tok)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what PreTrainedTokenizerFast(tokenizer_file=) calls
    assert hf.token_to_id(EOT) == tok.eot_id
    for text in TEXTS: assert hf.encode(text).ids == load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == EOT
    assert config["model_max_length"] == 64
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
