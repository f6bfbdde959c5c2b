import pytest
import torch

from petra.config import build_config

# tests of code with a separate GPU path run on both; CI has no GPU and skips the second
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the session: the default corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("petra-cache"))


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir):
    """The overrides of a tiny run that trains in seconds on a CPU (12 steps of 4 x 64 tokens)."""
    return {
        "preset": "tiny",
        "data.cache_dir": cache_dir,
        "train.steps": 12,
        "train.batch_size": 4,
        "train.eval_every": 6,
        "train.val_tokens": 512,
        "train.log_every": 1,
        "train.save_every": 0,
        "train.seq_len": 64,
    }


@pytest.fixture
def tiny_cfg(tiny_overrides):
    def make(**ov):
        return build_config(overrides={**tiny_overrides, **ov})

    return make


def dispatched(fn) -> int:
    """How many operations fn() dispatches: on a GPU each is a kernel launch the host issues.
    Views and reads of CPU scalars (step counts) launch nothing and are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n
