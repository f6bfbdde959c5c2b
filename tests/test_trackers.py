"""Trackers beside metrics.jsonl: TensorBoard for real, wandb and trackio through their API
(a stand-in module records the calls), and a missing package refused before any work."""

import json
import sys
import types

import pytest

from petra.config import ConfigError
from petra.metrics import read_metrics
from petra.train import train

quiet = dict(show_progress=False, log=lambda *a: None)


def _numbers(run):
    """(step, name, value) of every number metrics.jsonl holds, named as the trackers name them."""
    out = set()
    for r in read_metrics(run / "metrics.jsonl"):
        for k, v in r.items():
            if k not in ("step", "tokens") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.add((r["step"], f"{'val' if k.startswith('val_') else 'train'}/{k}", float(v)))
    return out


def test_tensorboard_gets_every_number_of_metrics_jsonl(tmp_path, tiny_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    train(tiny_cfg(**{"train.log_to": "tensorboard"}), run, **quiet)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    got = {(e.step, tag, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want = _numbers(run)
    assert {(s, t) for s, t, _ in got} == {(s, t) for s, t, _ in want}
    assert all(v == pytest.approx(dict(((s, t), x) for s, t, x in want)[(s, t)], rel=1e-6) for s, t, v in got)
    assert {t for _, t, _ in got} >= {"train/loss", "train/lr", "val/val_loss"}


def _stand_in(name, calls):
    m = types.ModuleType(name)
    m.init = lambda **kw: calls.append(("init", kw))
    m.log = lambda d, step=None: calls.append(("log", step, dict(d)))
    m.finish = lambda: calls.append(("finish",))
    return m


def test_wandb_and_trackio_get_the_run_and_its_numbers(tmp_path, tiny_cfg, monkeypatch):
    calls = {"wandb": [], "trackio": []}
    for name in calls:
        monkeypatch.setitem(sys.modules, name, _stand_in(name, calls[name]))
    run = tmp_path / "r"
    cfg = tiny_cfg(**{"train.log_to": "wandb,trackio", "train.tracker_project": "p"})
    train(cfg, run, **quiet)
    want = _numbers(run)
    for name, c in calls.items():
        assert c[0][0] == "init" and c[0][1]["project"] == "p" and c[0][1]["name"] == f"{tmp_path.name}/r"
        assert c[0][1]["config"] == json.loads((run / "config.json").read_text())
        assert c[-1] == ("finish",) and sum(1 for x in c if x[0] == "finish") == 1
        got = {(step, k, v) for kind, step, d in (x for x in c if x[0] == "log") for k, v in d.items()}
        assert got == want
    assert calls["wandb"][0][1]["dir"] == str(run)  # wandb's files stay in the run directory


def test_a_missing_tracker_package_or_unknown_name_fails_before_any_work(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="train.log_to=wandb needs its package: pip install wandb"):
        train(tiny_cfg(**{"train.log_to": "wandb"}), tmp_path / "r", **quiet)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="train.log_to='mlflow' is not allowed; choose one of: tensorboard"):
        tiny_cfg(**{"train.log_to": "mlflow"})
