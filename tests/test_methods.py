"""Methods as the loop sees them: checks made against the parallel strategy before any work,
optimizers, and the typed step-end result; and a new method plugging in without the loop
knowing it."""

import pytest
import torch

from petra.config import ConfigError, build_config
from petra.methods import REGISTRY, Method, StepEnd, make_method
from petra.model import build_model
from petra.optim import AdamW, GaLoreAdamW8bit
from petra.parallel import DDP, FSDP, NoParallel


def _cfg(**ov):
    return build_config(overrides={"preset": "tiny", "train.steps": 10, **ov})


@pytest.mark.parametrize(
    "ov, strategy, message",
    [
        ({"method.name": "relora", "method.layerwise": True}, NoParallel, "layerwise is for the full and low-rank"),
        ({"method.name": "relora", "method.quantize": "int8"}, FSDP, "quantize does not run under FSDP2"),
    ],
)
def test_each_method_refuses_what_it_cannot_do_under_its_strategy(ov, strategy, message):
    with pytest.raises(ConfigError, match=message):
        make_method(_cfg(**ov), strategy())  # a strategy object needs no process group to be asked


@pytest.mark.parametrize("name", ["relora", "galore-adafactor"])
def test_the_same_methods_are_allowed_under_ddp(name):
    ov = {"method.name": name, **({"method.quantize": "int8"} if name == "relora" else {})}
    assert make_method(_cfg(**ov), DDP()).name == name


def test_an_unknown_method_names_the_registered_ones():
    cfg = _cfg()
    cfg.method.name = "sgd"
    with pytest.raises(ConfigError, match="method.name='sgd' is not allowed; choose one of: full, full8bit"):
        make_method(cfg)


@pytest.mark.parametrize("strategy, after_backward", [(NoParallel, False), (FSDP, False), (DDP, True)])
def test_layerwise_updates_wait_for_backward_only_where_hooks_see_unreduced_gradients(strategy, after_backward):
    method = make_method(_cfg(**{"method.name": "galore", "method.layerwise": True}), strategy())
    method.optimizer(build_model(_cfg().model, torch.device("cpu"), torch.float32))
    assert method.layerwise.after_backward is after_backward


@pytest.mark.parametrize("name, cls", [("full", AdamW), ("full8bit", GaLoreAdamW8bit)])
def test_full_rank_layerwise_uses_petras_adamw_or_its_8bit_state(name, cls):
    pytest.importorskip("torchao")
    cfg = _cfg(**{"method.name": name, "method.layerwise": True})
    method = make_method(cfg)
    opt = method.optimizer(build_model(cfg.model, torch.device("cpu"), torch.float32))
    assert type(opt) is cls and method.layerwise is not None and method.layerwise.optimizer is opt


def test_relora_step_end_results_are_typed():
    cfg = _cfg(**{"method.name": "relora", "method.warm_start_steps": 2, "method.reset_interval": 3, "method.rank": 8})
    method = make_method(cfg)
    model = method.prepare(build_model(cfg.model, torch.device("cpu"), torch.float32))
    opt = method.optimizer(model)
    ends = {}
    for step in range(8):
        end = method.on_step_end(step, model, opt)
        assert isinstance(end, StepEnd)
        model, opt = end.model, end.optimizer
        ends[step + 1] = end
    assert ends[2].params_changed and ends[2].event.startswith("warm start ended")
    assert opt is not ends[1].optimizer  # the LoRA phase has its own optimizer
    assert ends[5].event.startswith("ReLoRA merge 1:") and ends[5].fields == {"moments_pruned": 0.0}  # no moments yet
    assert not ends[5].params_changed
    assert [s for s, e in ends.items() if e.event] == [2, 5, 8]


def test_a_new_method_plugs_in_without_the_loop_knowing_it(tmp_path, tiny_cfg, monkeypatch):
    """A method registered under an existing name's slot: the loop runs its optimizer,
    schedule and step-end hook, and writes its events to metrics.jsonl."""
    from petra.metrics import read_metrics
    from petra.train import train

    class HalfLR(Method):
        name = "full"
        seen: list = []

        def lr_factor(self, step):
            return 0.5

        def on_step_end(self, step, model, optimizer):
            self.seen.append(step)
            return StepEnd(model, optimizer, event="tick" if step == 3 else "", fields={"k": 1})

    monkeypatch.setitem(REGISTRY, "full", HalfLR)
    train(tiny_cfg(**{"train.steps": 6}), tmp_path / "r", show_progress=False, log=lambda *a: None)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert HalfLR.seen == list(range(6))
    assert {r["lr"] for r in rows if "lr" in r} == {0.5 * 1e-3}
    assert [r for r in rows if "event" in r] == [{"step": 4, "tokens": 4 * 4 * 64, "event": "tick", "k": 1}]


def test_the_torch_free_list_of_unsharded_methods_is_the_methods_own():
    """estimate and plan read config.UNSHARDED_METHODS without importing the methods; each
    method's check is what refuses FSDP2."""
    from petra.config import METHODS, UNSHARDED_METHODS, build_config
    from petra.parallel import strategy

    refused = []
    for name in METHODS:
        try:
            make_method(build_config(overrides={"preset": "tiny", "method.name": name}), strategy("fsdp", 0, 2)).check()
        except ConfigError as e:
            assert "does not run under FSDP2" in str(e)
            refused.append(name)
    assert tuple(refused) == UNSHARDED_METHODS
