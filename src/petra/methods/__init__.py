"""Training methods, by name. A method is a `Method` subclass in this package registered
here; the loop (train.py) sees only the `Method` interface and never branches on a name."""
from __future__ import annotations

from ..config import RunConfig
from .base import Method
from .full import Full8bit
from .galore import GaLore
from .relora import ReLoRA

REGISTRY: dict[str, type[Method]] = {"full": Method, "full8bit": Full8bit, "galore": GaLore, "galore8bit": GaLore,
                                     "galore-adafactor": GaLore, "relora": ReLoRA}


def make_method(cfg: RunConfig) -> Method:
    if cfg.method.name not in REGISTRY:
        raise ValueError(f"unknown method {cfg.method.name!r}; methods are: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.method.name](cfg)


__all__ = ["REGISTRY", "Method", "make_method"]
