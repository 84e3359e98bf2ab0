"Run inside a fresh virtual environment holding only the built wheel and its core dependencies."
import importlib.util

for dev_only in ("nbdev", "jupyter", "matplotlib", "datasets", "tokenizers"):
    assert importlib.util.find_spec(dev_only) is None, f"{dev_only} should not be installed with the core wheel"

import torch

import vishwamai
from vishwamai import Vishwamai, VishwamaiConfig

cfg = VishwamaiConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, num_experts=4, top_k=2, max_seq_len=128)
model = Vishwamai(cfg)
ids = torch.randint(0, 256, (2, 37))
out = model(ids, labels=ids)
assert out.logits.shape == (2, 37, 256) and torch.isfinite(out.loss), out.loss
out.loss.backward()
generated = model.generate(ids[:, :5], 8, temperature=0)
assert generated.shape == (2, 13)
print(f"vishwamai {vishwamai.__version__} from {vishwamai.__file__} with torch {torch.__version__}: "
      f"forward, backward and generation ran (loss {out.loss.item():.3f})")
