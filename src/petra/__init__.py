"""petra: parameter-efficient pre-training of LLaMA models (full-rank, GaLore, ReLoRA)."""

__version__ = "0.1.0"
__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "__version__"]


def __getattr__(name: str):
    # the optimizers import torch; commands that never train (data prepare, estimate, --help)
    # start without it
    if name in ("GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'petra' has no attribute {name!r}")
