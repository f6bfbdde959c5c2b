"""petra: parameter-efficient pre-training of LLaMA models (full-rank, GaLore, ReLoRA)."""
from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__version__ = "0.1.0"
__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "__version__"]
