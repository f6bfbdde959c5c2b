"""Run configuration: dataclasses, model presets, YAML loading and validation.

A run is described by one `RunConfig` (model, data, train, method sections). It is built
from a preset, then a YAML file, then `section.key=value` overrides, and validated before
any expensive work starts, so a typo fails in milliseconds with the allowed values named.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_attention_heads: int = 8
    num_hidden_layers: int = 8
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Round the MLP width up to a multiple of this (0 = off). Off for the paper presets so
    # their parameter counts stay the papers'; 128 makes eager bf16 matmuls much faster.
    pad_intermediate_to: int = 0
    # Recompute each decoder layer in backward instead of storing its activations.
    activation_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        m = self.pad_intermediate_to
        return self.intermediate_size if m <= 0 else -(-self.intermediate_size // m) * m


# Presets from the GaLore paper (vocab 32000, sequence 256), plus two that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_hidden_layers=2, max_position_embeddings=128),
    "mini": dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                 num_hidden_layers=4, max_position_embeddings=256),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}

# the rank each paper run used at that scale (GaLore Table 2); small ranks for the CPU presets
PRESET_RANKS = {"tiny": 16, "mini": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

METHODS = ("full", "full8bit", "galore", "galore8bit", "galore-adafactor", "relora")
PROJ_TYPES = ("std", "left", "right", "full")
PROJECTORS = ("svd", "randomized", "subspace")
SWITCH_STATES = ("keep", "reproject", "reset")
PRUNE_MODES = ("magnitude", "random", "reset")
PRUNE_MASKS = ("joint", "independent")
QUANTIZE = ("none", "int8", "nf4")
SHUFFLES = ("feistel", "randperm")


@dataclass
class DataConfig:
    # "bible" (default corpus, installed with petra), a directory written by `petra data prepare`
    # or `petra data build`, or a comma-separated list of files (.txt, .jsonl, either one .gz or
    # .zst compressed, .parquet), directories and glob patterns
    source: str = "bible"
    # tokenizer.json, a SentencePiece .model, or "" to train a byte-level BPE on the corpus.
    tokenizer: str = ""
    val_fraction: float = 0.05
    text_field: str = "text"      # the text's field in JSON lines, its column in parquet
    # text files are decoded with this codec; anything else is an error naming the byte
    # offset, so text is never silently changed (set e.g. latin-1 for such a corpus)
    encoding: str = "utf-8"
    cache_dir: str = "~/.cache/petra"
    # the order of the training windows in each pass: feistel (computed, any corpus size) or
    # randperm (a stored permutation, as runs made before token shards drew them)
    shuffle: str = "feistel"


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 32          # sequences per optimizer step (the total batch, all processes)
    micro_batch_size: int = 0     # sequences per forward and process; 0 = all of its share
    seq_len: int = 0              # 0 = the model's max_position_embeddings
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_steps: int = -1        # -1 = 10% of steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0        # 0 = off
    seed: int = 0
    eval_every: int = 50
    val_tokens: int = 1_000_000   # the validation set's size (the whole split if it is smaller)
    save_every: int = 100         # 0 = only at the end
    log_every: int = 10
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"         # auto (on for CUDA) | on | off
    stop_after: int = 0           # end the run at this step as if interrupted (0 = off)
    parallel: str = "auto"        # under torchrun: auto (= ddp) | ddp | fsdp; none = one process
    fsdp_unit_layers: int = 1     # FSDP2: decoder layers sharded and gathered as one unit
    init_from: str = ""           # a run directory or HF-format export: its weights start this run
    # a step whose loss or gradient is not finite is skipped (no update); this many in a
    # row stop the run (the last good checkpoint stays as it was)
    max_skipped_steps: int = 5
    # steps the loss may stay above ln(vocab) + 1 (worse than guessing: diverging) or the
    # gradient norm at exactly 0 (collapsed) before the run stops as failed; 0 = never
    divergence_patience: int = 50


@dataclass
class MethodConfig:
    name: str = "full"
    # low-rank targets: regex on parameter names (attention and MLP matrices by default)
    targets: str = r"(self_attn|mlp)\.\w+_proj"
    rank: int = 0                 # 0 = the preset's paper rank (PRESET_RANKS)
    # GaLore
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    # warm subspace iteration: 99.4% of exact SVD's captured energy on real gradients, equal
    # loss, 15-40x cheaper refresh (docs/projector_energy.json, docs/benchmarks.md)
    projector: str = "subspace"
    switch_state: str = "keep"
    layerwise: bool = False
    # ReLoRA
    lora_alpha: float = 32.0
    reset_interval: int = 1000
    prune: str = "magnitude"
    prune_fraction: float = 0.99
    # one mask for both moments (joint), or one each as the reference code does (independent)
    prune_mask: str = "joint"
    restart_warmup_steps: int = 50
    warm_start_steps: int = 0
    quantize: str = "none"


@dataclass
class RunConfig:
    preset: str = "mini"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    # -- derived values ---------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_position_embeddings

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size

    @property
    def warmup_steps(self) -> int:
        w = self.train.warmup_steps
        return max(1, self.train.steps // 10) if w < 0 else w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "method": MethodConfig}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _coerce(section: str, key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, naming the field on failure."""
    cls = SECTIONS[section]
    types = {f.name: f.type for f in fields(cls)}
    if key not in types:
        raise ConfigError(f"unknown option {section}.{key}; {section} options are: {', '.join(types)}")
    t = types[key]
    try:
        if t == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t == "float":
            f = float(value)
            if not math.isfinite(f):
                raise ValueError
            return f
        return str(value)
    except (TypeError, ValueError):
        what = "finite number" if t == "float" else t
        raise ConfigError(f"{section}.{key}={value!r} is not a valid {what}") from None


def build_config(preset: str = "mini", overrides: dict[str, Any] | None = None,
                 file: str | Path | None = None) -> RunConfig:
    """Preset, then YAML file, then `section.key` overrides; then validation."""
    file_data: dict[str, Any] = {}
    if file is not None:
        import yaml
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            file_data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {str(p)!r} is not valid YAML:{where}: {what}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read ({e})") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        preset = file_data.pop("preset", preset)
    flat: dict[str, Any] = {}
    for section, values in file_data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {file}; sections are: preset, {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} in {file} must be a mapping")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", preset)
    flat.update(overrides)

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
    cfg = RunConfig(preset=preset, model=ModelConfig(**PRESETS[preset]))
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"override {dotted!r} must look like section.key with section one of "
                              f"{', '.join(SECTIONS)}")
        setattr(getattr(cfg, section), key, _coerce(section, key, value))
    if cfg.method.rank == 0:
        cfg.method.rank = PRESET_RANKS[preset]
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with to_dict (used on resume). A field added since the
    run was saved takes the value that reproduces how that run trained."""
    d = json.loads(json.dumps(d))
    d["method"].setdefault("prune_mask", "independent")  # before prune_mask, moments were pruned so
    d["data"].setdefault("shuffle", "randperm")  # before token shards, windows were ordered by randperm
    if "jsonl_field" in d["data"]:  # renamed when parquet came
        d["data"]["text_field"] = d["data"].pop("jsonl_field")
    t = d["train"]
    if "eval_batches" in t:  # before val_tokens: that many global batches of the run's sequence length
        seq = t["seq_len"] or d["model"]["max_position_embeddings"]
        t["val_tokens"] = t.pop("eval_batches") * t["batch_size"] * seq
    return RunConfig(preset=d["preset"], **{s: cls(**d[s]) for s, cls in SECTIONS.items()})


def validate_data(d: DataConfig) -> None:
    try:
        "".encode(d.encoding)
    except LookupError:
        raise ConfigError(f"data.encoding={d.encoding!r} is not a text encoding Python knows "
                          f"(e.g. utf-8, latin-1, cp1252)") from None
    if not 0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")
    _choice("data.shuffle", d.shuffle, SHUFFLES)


def validate(cfg: RunConfig) -> None:
    m, t, me = cfg.model, cfg.train, cfg.method
    for name, v in [("model.hidden_size", m.hidden_size), ("model.num_hidden_layers", m.num_hidden_layers),
                    ("model.num_attention_heads", m.num_attention_heads), ("model.vocab_size", m.vocab_size),
                    ("model.intermediate_size", m.intermediate_size), ("train.steps", t.steps),
                    ("train.batch_size", t.batch_size)]:
        if v < 1:
            raise ConfigError(f"{name}={v} must be at least 1")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"head dimension {m.head_dim} must be even for rotary embeddings")
    if cfg.seq_len > m.max_position_embeddings:
        raise ConfigError(f"train.seq_len={cfg.seq_len} is longer than the model allows "
                          f"(model.max_position_embeddings={m.max_position_embeddings})")
    if t.micro_batch_size < 0 or cfg.train.batch_size % cfg.micro_batch:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    for name, v in [(f"train.{f.name}", getattr(t, f.name)) for f in fields(t) if f.type == "float"] + \
            [(f"method.{f.name}", getattr(me, f.name)) for f in fields(me) if f.type == "float"]:
        if not math.isfinite(v):
            raise ConfigError(f"{name}={v} must be a finite number")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if t.max_skipped_steps < 0 or t.divergence_patience < 0:
        raise ConfigError("train.max_skipped_steps and train.divergence_patience must be >= 0")
    validate_data(cfg.data)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
    if t.val_tokens < 1:
        raise ConfigError(f"train.val_tokens={t.val_tokens} must be at least 1")
    _choice("train.dtype", t.dtype, ("auto", "bf16", "fp32"))
    _choice("train.compile", t.compile, ("auto", "on", "off"))
    _choice("train.parallel", t.parallel, ("auto", "none", "ddp", "fsdp"))
    if t.fsdp_unit_layers < 1:
        raise ConfigError(f"train.fsdp_unit_layers={t.fsdp_unit_layers} must be at least 1 (decoder layers "
                          f"per FSDP2 unit)")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    _choice("method.name", me.name, METHODS)
    _choice("method.proj_type", me.proj_type, PROJ_TYPES)
    _choice("method.projector", me.projector, PROJECTORS)
    _choice("method.switch_state", me.switch_state, SWITCH_STATES)
    _choice("method.prune", me.prune, PRUNE_MODES)
    _choice("method.prune_mask", me.prune_mask, PRUNE_MASKS)
    _choice("method.quantize", me.quantize, QUANTIZE)
    if me.rank < 1:
        raise ConfigError(f"method.rank={me.rank} must be at least 1")
    if me.update_proj_gap < 1:
        raise ConfigError(f"method.update_proj_gap={me.update_proj_gap} must be at least 1")
    if me.reset_interval < 1:
        raise ConfigError(f"method.reset_interval={me.reset_interval} must be at least 1")
    if not 0 <= me.prune_fraction <= 1:
        raise ConfigError(f"method.prune_fraction={me.prune_fraction} must be in [0, 1]")
    if me.restart_warmup_steps < 0 or me.warm_start_steps < 0:
        raise ConfigError("method.restart_warmup_steps and method.warm_start_steps must be >= 0")
    if me.name.startswith("galore"):
        short = min(m.hidden_size, m.intermediate_size)
        if me.rank > short and me.proj_type != "full":
            raise ConfigError(f"method.rank={me.rank} is larger than the smallest side ({short}) of the "
                              f"{cfg.preset} matrices; use rank <= {short} or method.proj_type=full")
    if me.quantize != "none" and me.name != "relora":
        raise ConfigError(f"method.quantize={me.quantize} holds ReLoRA's frozen weights quantized; "
                          f"it needs method.name=relora (got {me.name})")
    if me.name == "relora" and me.rank > min(m.hidden_size, m.intermediate_size):
        raise ConfigError(f"method.rank={me.rank} is larger than the smallest side "
                          f"({min(m.hidden_size, m.intermediate_size)}) of the {cfg.preset} matrices")


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of cfg with some section fields changed (used by compare)."""
    out = from_dict(json.loads(cfg.to_json()))
    for s, values in sections.items():
        setattr(out, s, dataclasses.replace(getattr(out, s), **values))
    validate(out)
    return out
