"""Experiment trackers beside metrics.jsonl (which is always written): every metrics record
also goes to TensorBoard, Weights & Biases or trackio, chosen by `train.log_to`. Each
package is imported only when chosen, and checked before the run starts."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from .config import ConfigError, tracker_names


def check_installed(log_to: str) -> None:
    """A chosen tracker whose package (of the tracker's name) is missing: one line naming the
    install, before any work."""
    for name in tracker_names(log_to):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"train.log_to={name} needs its package: pip install {name}") from None


def _scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, named as trackers group them (train/..., val/...)."""
    out = {}
    for k, v in record.items():
        if k in ("step", "tokens") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"{'val' if k.startswith('val_') else 'train'}/{k}"] = float(v)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, project: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _RunTracker:
    """wandb and trackio share an API: init(project, name, config, ...), log(dict, step), finish()."""

    def __init__(self, module: str, run_dir: Path, config: dict, project: str):
        self.m = importlib.import_module(module)
        # the same run directory resumes the same tracker run
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        # the directory and its parent: compare's runs (METHOD/seed-K, tune/METHOD/lr-X) stay apart
        name = "/".join(run_dir.resolve().parts[-2:])
        kw = dict(project=project, name=name, config=config, resume="allow")
        if module == "wandb":
            self.run = self.m.init(id=run_id, dir=str(run_dir), **kw)
        else:
            self.run = self.m.init(**kw)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.m.log(scalars, step=step)

    def close(self) -> None:
        self.m.finish()


def open_trackers(log_to: str, run_dir: Path, config: dict, project: str) -> list:
    out = []
    for name in tracker_names(log_to):
        if name == "tensorboard":
            out.append(TensorBoard(Path(run_dir), config, project))
        else:
            out.append(_RunTracker(name, Path(run_dir), config, project))
    return out


class Trackers:
    """The open trackers, fed the metrics records TrainLog writes."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def write(self, record: dict) -> None:
        scalars = _scalars(record)
        if scalars and "step" in record:
            for t in self.trackers:
                t.log(int(record["step"]), scalars)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
