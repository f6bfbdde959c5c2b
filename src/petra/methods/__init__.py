"""Training methods, by name. A method is a `Method` subclass in this package registered
here; the loop (train.py) sees only the `Method` interface and never branches on a name."""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..parallel import NoParallel
from .apollo import Apollo
from .base import Method, StepEnd
from .full import Full8bit
from .galore import GaLore
from .muon import AdamMini, Muon
from .relora import ReLoRA

REGISTRY: dict[str, type[Method]] = {
    "full": Method,
    "full8bit": Full8bit,
    "galore": GaLore,
    "galore8bit": GaLore,
    "galore-adafactor": GaLore,
    **dict.fromkeys(Apollo.OPTIMIZERS, Apollo),
    "relora": ReLoRA,
    "muon": Muon,
    "adam-mini": AdamMini,
}


def make_method(cfg: RunConfig, parallel: NoParallel | None = None) -> Method:
    """The method of `cfg` under `parallel` (one process by default), its checks passed."""
    if cfg.method.name not in REGISTRY:
        raise ConfigError(f"method.name={cfg.method.name!r} is not allowed; choose one of: {', '.join(REGISTRY)}")
    method = REGISTRY[cfg.method.name](cfg, parallel)
    method.check()
    return method


__all__ = ["REGISTRY", "Method", "StepEnd", "make_method"]
