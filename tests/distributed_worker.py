"""Run under torchrun by test_distributed.py: the training jobs listed in a JSON file, in order,
in one process group (one launch, several runs)."""

import json
import os
import sys

import torch.distributed as dist

from petra.config import build_config
from petra.train import train

for job in json.loads(open(sys.argv[1]).read()):
    # a resume may change what a resume may change ("change": e.g. train.parallel)
    cfg = build_config(overrides=job["overrides"]) if "overrides" in job else None
    explicit = {tuple(k.split(".", 1)) for k in job.get("change", ())}
    train(cfg, job["out"], resume=job.get("resume", False), explicit=explicit, show_progress=False, log=lambda *a: None)
if dist.is_initialized():  # then leave without gloo's teardown, which a loaded machine makes abort now and then
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
