"Vishwamai: a Mixture of Experts with causal Multi-Level Attention, as a literate PyTorch library."
__version__ = "0.1.0"

from .config import VishwamaiConfig, param_counts
from .moe import MoE
from .attention import MultiLevelAttention
from .model import Vishwamai, VishwamaiOutput, dense_baseline
from .train import TrainConfig, train, load_checkpoint
