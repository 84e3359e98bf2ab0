"Vishwamai: a Mixture of Experts with causal Multi-Level Attention, as a literate PyTorch library."
__version__ = "0.1.0"

from .config import VishwamaiConfig, param_counts
from .moe import MoE
from .attention import MultiLevelAttention
from .model import Vishwamai, VishwamaiOutput, dense_baseline
from .checkpoint import load_checkpoint
from .hub import save_tokenizer  # importing hub gives Vishwamai save_pretrained, from_pretrained and push_to_hub
from .train import TrainConfig, train

__all__ = ["VishwamaiConfig", "param_counts", "MoE", "MultiLevelAttention", "Vishwamai", "VishwamaiOutput", "dense_baseline",
           "load_checkpoint", "save_tokenizer", "TrainConfig", "train"]
