"""Run configuration: dataclasses, model presets, YAML loading and validation.

A run is described by one `RunConfig` (model, data, train, method sections). It is built
from a preset, then a YAML file, then `section.key=value` overrides, and validated before
any expensive work starts, so a typo fails in milliseconds with the allowed values named.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is allowed."""


def _f(default, help: str, factory=None):
    """A config field with its description: the one text the CLI's --help and the docs show."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = _f(32000, "tokens in the vocabulary (raised to the tokenizer's size if that is larger)")
    hidden_size: int = _f(512, "width of the residual stream")
    intermediate_size: int = _f(1376, "width of the SwiGLU MLP")
    num_attention_heads: int = _f(8, "attention heads per layer")
    num_hidden_layers: int = _f(8, "decoder layers")
    max_position_embeddings: int = _f(256, "longest sequence the model takes")
    rms_norm_eps: float = _f(1e-6, "RMSNorm epsilon")
    rope_theta: float = _f(10000.0, "RoPE base")
    init_std: float = _f(0.02, "standard deviation of the initial weights")
    # Off for the paper presets so their parameter counts stay the papers'. (Widths tensor
    # cores cannot take are computed padded with zero units anyway: model.aligned_pad.)
    pad_intermediate_to: int = _f(0, "round the MLP width up to a multiple of this (0 = off)")
    activation_checkpointing: bool = _f(
        False, "recompute each decoder layer in backward instead of storing its activations"
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        m = self.pad_intermediate_to
        return self.intermediate_size if m <= 0 else -(-self.intermediate_size // m) * m


# Presets from the GaLore paper (vocab 32000, sequence 256), plus two that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=128,
    ),
    "mini": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=256,
    ),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}

# the rank each paper run used at that scale (GaLore Table 2); small ranks for the CPU presets
PRESET_RANKS = {"tiny": 16, "mini": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

METHODS = (
    "full",
    "full8bit",
    "galore",
    "galore8bit",
    "galore-adafactor",
    "apollo",
    "apollo8bit",
    "apollo-mini",
    "apollo-mini8bit",
    "fira",
    "fira8bit",
    "relora",
    "muon",
    "adam-mini",
)
# methods with a low-rank subspace of the hidden matrices (method.rank, method.scale apply)
LOWRANK_METHODS = tuple(m for m in METHODS if m.startswith(("galore", "apollo", "fira")))
RANKED_METHODS = (*LOWRANK_METHODS, "relora")  # methods for which method.rank means something
# methods that refuse FSDP2 (methods/ says why; tests/test_methods.py keeps the two equal)
UNSHARDED_METHODS: tuple[str, ...] = ()


def method_defaults(name: str, preset: str) -> dict[str, Any]:
    """What method.rank and method.scale mean when left at 0: each method's paper setting.
    APOLLO-Mini is rank 1 with scale sqrt(128); APOLLO scale 1; GaLore and Fira 0.25 (Fira's
    scripts up to 350M); every other rank is the preset's paper rank."""
    mini = name.startswith("apollo-mini")
    scale = math.sqrt(128) if mini else 1.0 if name.startswith("apollo") else 0.25
    return {"rank": 1 if mini else PRESET_RANKS[preset], "scale": scale}


# experiment trackers train.log_to may name (each is also the package that provides it)
TRACKERS = ("tensorboard", "wandb", "trackio")


def tracker_names(log_to: str) -> list[str]:
    """The trackers of a train.log_to value ('tensorboard,wandb')."""
    return [n.strip() for n in log_to.split(",") if n.strip()]


# every field whose value is one of a few words, declared once: validation and --help read this
CHOICES: dict[str, tuple[str, ...]] = {
    "data.shuffle": ("feistel", "randperm"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "train.compile": ("auto", "on", "off"),
    "train.kernels": ("torch", "liger"),
    "train.parallel": ("auto", "none", "ddp", "fsdp"),
    "method.name": METHODS,
    "method.proj_type": ("std", "left", "right", "full"),
    "method.projector": ("svd", "randomized", "subspace", "random"),
    "method.switch_state": ("keep", "reproject", "reset"),
    "method.prune": ("magnitude", "random", "reset"),
    "method.prune_mask": ("joint", "independent"),
    "method.quantize": ("none", "int8", "nf4"),
    "method.int8_weights": ("off", "stochastic", "nearest"),
    "method.moments": ("auto", "fp32", "bf16"),
}


@dataclass
class DataConfig:
    source: str = _f(
        "bible",
        "'bible' (installed with petra), a directory written by `petra data prepare` or "
        "`petra data build`, or a comma-separated list of .txt/.jsonl(.gz/.zst)/.parquet files, "
        "directories and glob patterns",
    )
    tokenizer: str = _f("", "tokenizer.json, a SentencePiece .model, or '' to train a byte-level BPE on the corpus")
    val_fraction: float = _f(0.05, "share of documents held out for validation")
    text_field: str = _f("text", "the text's field in JSON lines, its column in parquet")
    # anything not in the codec is an error naming the byte offset: text is never silently changed
    encoding: str = _f("utf-8", "codec of text files (e.g. latin-1 for such a corpus)")
    cache_dir: str = _f("~/.cache/petra", "where prepared token shards of raw sources are kept")
    shuffle: str = _f(
        "feistel",
        "order of the training windows in each pass (feistel: computed, any corpus "
        "size; randperm: a stored permutation, as runs made before token shards drew them)",
    )


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps in the schedule")
    batch_size: int = _f(32, "sequences per optimizer step (the total batch, all processes)")
    micro_batch_size: int = _f(
        0, "sequences per forward and process (0 = all of its share); the rest is gradient accumulation"
    )
    seq_len: int = _f(0, "tokens per sequence (0 = the model's max_position_embeddings)")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "the cosine decays to lr x this")
    warmup_steps: int = _f(-1, "linear warm-up steps (-1 = 10% of steps)")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed for initialization and data order")
    eval_every: int = _f(50, "steps between validation evaluations")
    val_tokens: int = _f(1_000_000, "size of the validation set in tokens (the whole split if it is smaller)")
    save_every: int = _f(100, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = _f(
        1, "checkpoints kept: checkpoint.pt and the previous ones as checkpoint-stepN.pt (1 = the latest only)"
    )
    sample_every: int = _f(0, "steps between sample generations printed and logged to metrics.jsonl (0 = off)")
    sample_prompt: str = _f("", "the prompt of those samples ('' = the first 8 tokens of the validation text)")
    log_every: int = _f(10, "steps between metrics lines")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _f(
        0, "CPU threads of this process (0 = torch's default, one per core; 1 on a busy machine or with compare --jobs)"
    )
    dtype: str = _f("auto", "weights and compute (auto = bf16 on CUDA, fp32 on CPU)")
    compile: str = _f("auto", "torch.compile the model (auto = on for CUDA)")
    kernels: str = _f(
        "torch",
        "RMSNorm, rotary embedding, SwiGLU and the loss: torch (any device) or liger "
        "(liger-kernel's Triton kernels, CUDA; pip install 'petra[liger]')",
    )
    stop_after: int = _f(0, "end the run at this step as if interrupted (0 = off)")
    parallel: str = _f("auto", "processes under torchrun (auto = ddp; none = one process)")
    log_to: str = _f("", "also log metrics to these trackers (comma-separated: tensorboard, wandb, trackio)")
    tracker_project: str = _f("petra", "the wandb / trackio project of the run")
    fsdp_unit_layers: int = _f(1, "FSDP2: decoder layers sharded and gathered as one unit")
    init_from: str = _f(
        "",
        "start from the weights of a run directory (e.g. ReLoRA after a full-rank run), a petra export or any "
        "Hugging Face Llama directory (its architecture and tokenizer too)",
    )
    # the last good checkpoint stays as it was
    max_skipped_steps: int = _f(
        5, "a step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run"
    )
    divergence_patience: int = _f(
        50,
        "steps the loss may stay above ln(vocab) + 1 (diverging) or the gradient "
        "norm at exactly 0 (collapsed) before the run stops as failed; 0 = never",
    )


@dataclass
class MethodConfig:
    name: str = _f("full", "training method")
    targets: str = _f(
        r"(self_attn|mlp)\.\w+_proj",
        "low-rank targets: a regex searched in parameter names (attention and MLP matrices)",
    )
    rank: int = _f(0, "rank of the GaLore, APOLLO and Fira projections and ReLoRA's factors (0 = the paper's)")
    update_proj_gap: int = _f(200, "GaLore, APOLLO, Fira: steps between projector refreshes")
    stagger_refresh: bool = _f(
        True,
        "GaLore, APOLLO, Fira: each matrix refreshes its projector at its own step of the gap "
        "(no step pays for every refresh); off: all at once, as galore-torch",
    )
    scale: float = _f(
        0.0, "scale of the low-rank update (0 = the method's paper value: GaLore, Fira 0.25; APOLLO 1; Mini sqrt(128))"
    )
    proj_type: str = _f("std", "GaLore: side to project (std = the shorter; squares from the right)")
    # warm subspace iteration: 99.4% of exact SVD's captured energy on real gradients, equal
    # loss, 15-40x cheaper refresh (docs/projector_energy.json, docs/benchmarks.md)
    projector: str = _f("subspace", "GaLore and Fira projector refresh (random: Gaussian, as APOLLO always draws)")
    switch_state: str = _f("keep", "GaLore: what the moments do at a refresh")
    layerwise: bool = _f(
        False,
        "update each parameter inside backward (full rank and the GaLore, APOLLO and Fira methods; "
        "APOLLO and Fira with --grad-clip 0)",
    )
    lora_alpha: float = _f(32.0, "ReLoRA: LoRA scaling alpha (the update is alpha / rank x B A)")
    reset_interval: int = _f(1000, "ReLoRA: steps between merge-and-restart")
    prune: str = _f("magnitude", "ReLoRA: how the factors' moments are pruned at a restart")
    prune_fraction: float = _f(0.99, "ReLoRA: share of moment entries pruned at a restart")
    prune_mask: str = _f("joint", "ReLoRA: one mask for both moments (joint) or one each, as the reference code")
    restart_warmup_steps: int = _f(50, "ReLoRA: learning-rate re-warm-up after each restart")
    warm_start_steps: int = _f(0, "ReLoRA: full-rank steps before LoRA")
    quantize: str = _f("none", "ReLoRA: frozen weights held in int8 or nf4 (bitsandbytes)")
    int8_weights: str = _f(
        "off",
        "GaLore, APOLLO, Fira: hold the hidden matrices in int8 (an absmax per method.int8_block values), "
        "their updates rounded stochastically (unbiased) or to nearest; embeddings, head and norms stay in "
        "train.dtype",
    )
    int8_block: int = _f(
        64,
        "int8 weights: values per fp32 absmax (a power of two, 16 to 4096; smaller blocks round more finely "
        "for 4/int8_block bytes a value)",
    )
    moments: str = _f(
        "auto",
        "dtype of the optimizer's moments (auto: fp32 in petra's optimizers, the weights' dtype in torch's "
        "AdamW and Muon; the 8-bit methods keep 8-bit moments)",
    )


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


def field_types(cls) -> dict[str, type]:
    """The (resolved) type of each field of a config section."""
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in {f.name for f in fields(cls)}}


def field_help(dotted: str) -> str:
    """The description of a field, e.g. 'train.lr' -> 'peak learning rate', with its choices."""
    section, _, key = dotted.partition(".")
    f = next(f for f in fields(SECTIONS[section]) if f.name == key)
    text = f.metadata.get("help", "")
    return f"{text}: {', '.join(CHOICES[dotted])}" if dotted in CHOICES else text


def _coerce(section: str, key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, naming the field on failure."""
    types = field_types(SECTIONS[section])
    if key not in types:
        raise ConfigError(f"unknown option {section}.{key}; {section} options are: {', '.join(types)}")
    t = types[key]
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes", "on")
            return bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t is float:
            f = float(value)
            if not math.isfinite(f):
                raise ValueError
            return f
        return str(value)
    except (TypeError, ValueError):
        what = "finite number" if t is float else t.__name__
        raise ConfigError(f"{section}.{key}={value!r} is not a valid {what}") from None


def build_config(
    preset: str = "mini", overrides: dict[str, Any] | None = None, file: str | Path | None = None
) -> RunConfig:
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
            raise ConfigError(
                f"override {dotted!r} must look like section.key with section one of {', '.join(SECTIONS)}"
            )
        setattr(getattr(cfg, section), key, _coerce(section, key, value))
    defaults = method_defaults(cfg.method.name, preset)
    cfg.method.rank = cfg.method.rank or defaults["rank"]
    cfg.method.scale = cfg.method.scale or defaults["scale"]
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with to_dict (used on resume). A field added since the
    run was saved takes the value that reproduces how that run trained."""
    d = json.loads(json.dumps(d))
    d["method"].setdefault("stagger_refresh", False)  # before it, every projector refreshed on one step
    d["method"].setdefault("prune_mask", "independent")  # before prune_mask, moments were pruned so
    d["data"].setdefault("shuffle", "randperm")  # before token shards, windows were ordered by randperm
    d["method"].setdefault("int8_block", 256)  # int8 weights came with blocks of 256
    if "jsonl_field" in d["data"]:  # renamed when parquet came
        d["data"]["text_field"] = d["data"].pop("jsonl_field")
    t = d["train"]
    if "eval_batches" in t:  # before val_tokens: that many global batches of the run's sequence length
        seq = t["seq_len"] or d["model"]["max_position_embeddings"]
        t["val_tokens"] = t.pop("eval_batches") * t["batch_size"] * seq
    return RunConfig(preset=d["preset"], **{s: cls(**d[s]) for s, cls in SECTIONS.items()})


def _check_section(name: str, section) -> None:
    """What every section shares: choices from CHOICES, finite floats."""
    for f in fields(section):
        v, dotted = getattr(section, f.name), f"{name}.{f.name}"
        if dotted in CHOICES:
            _choice(dotted, v, CHOICES[dotted])
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{dotted}={v} must be a finite number")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}={value} must be at least {low}")


def validate_model(m: ModelConfig) -> None:
    _check_section("model", m)
    for k in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "max_position_embeddings",
    ):
        _at_least(f"model.{k}", getattr(m, k), 1)
    for k in ("rms_norm_eps", "rope_theta", "init_std"):
        if getattr(m, k) <= 0:
            raise ConfigError(f"model.{k}={getattr(m, k)} must be positive")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dimension {m.head_dim} must be even for rotary embeddings")


def validate_data(d: DataConfig) -> None:
    _check_section("data", d)
    try:
        "".encode(d.encoding)
    except LookupError:
        raise ConfigError(
            f"data.encoding={d.encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)"
        ) from None
    if not 0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 0.5)")


def validate_train(t: TrainConfig) -> None:
    _check_section("train", t)
    for k, low in (
        ("steps", 1),
        ("batch_size", 1),
        ("val_tokens", 1),
        ("fsdp_unit_layers", 1),
        ("max_skipped_steps", 0),
        ("divergence_patience", 0),
        ("micro_batch_size", 0),
        ("threads", 0),
        ("seq_len", 0),
        ("eval_every", 1),
        ("log_every", 1),
        ("save_every", 0),
        ("stop_after", 0),
        ("warmup_steps", -1),
        ("seed", 0),
        ("keep_checkpoints", 1),
        ("sample_every", 0),
    ):
        _at_least(f"train.{k}", getattr(t, k), low)
    if t.seed >= 2**32:
        raise ConfigError(f"train.seed={t.seed} must be below 2**32 (4294967296)")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(t, k) < 1:
            raise ConfigError(f"train.{k}={getattr(t, k)} must be in [0, 1)")
    for k, v in (("eps", t.eps), ("grad_clip", t.grad_clip), ("weight_decay", t.weight_decay)):
        if v < 0 or (k == "eps" and v == 0):
            raise ConfigError(f"train.{k}={v} must be {'positive' if k == 'eps' else 'at least 0 (0 = off)'}")
    if t.batch_size % (t.micro_batch_size or t.batch_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={t.micro_batch_size}"
        )
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}")
    for name in tracker_names(t.log_to):
        _choice("train.log_to", name, TRACKERS)
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device={t.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    if t.kernels == "liger":
        _check_liger()


LIGER_TESTED = (0, 8)  # kernels.py calls its Functions positionally, as 0.8 orders their arguments


def _check_liger() -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            "train.kernels=liger needs liger-kernel (pip install 'petra[liger]'); else train.kernels=torch"
        )
    version = importlib.metadata.version("liger-kernel")
    if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < LIGER_TESTED:
        raise ConfigError(
            f"train.kernels=liger needs liger-kernel >= {'.'.join(map(str, LIGER_TESTED))}, "
            f"this environment has {version} (pip install -U 'petra[liger]')"
        )


def validate_method(me: MethodConfig, m: ModelConfig, preset: str) -> None:
    _check_section("method", me)
    for k, low in (
        ("rank", 1),
        ("update_proj_gap", 1),
        ("reset_interval", 1),
        ("restart_warmup_steps", 0),
        ("warm_start_steps", 0),
    ):
        _at_least(f"method.{k}", getattr(me, k), low)
    if not 0 <= me.prune_fraction <= 1:
        raise ConfigError(f"method.prune_fraction={me.prune_fraction} must be in [0, 1]")
    short = min(m.hidden_size, m.intermediate_size)
    if me.scale <= 0:
        raise ConfigError(f"method.scale={me.scale} must be positive")
    if me.rank > short and (me.name == "relora" or (me.name in LOWRANK_METHODS and me.proj_type != "full")):
        raise ConfigError(
            f"method.rank={me.rank} is larger than the smallest side ({short}) of the {preset} "
            f"matrices; use rank <= {short}" + (" or method.proj_type=full" if me.name.startswith("galore") else "")
        )
    if me.proj_type == "full" and me.name.startswith(("apollo", "fira")):
        raise ConfigError(f"method.proj_type=full is for GaLore; {me.name} scales the channels of one side")
    if me.quantize != "none" and me.name != "relora":
        raise ConfigError(
            f"method.quantize={me.quantize} holds ReLoRA's frozen weights quantized; "
            f"it needs method.name=relora (got {me.name})"
        )
    if me.int8_weights != "off" and me.name not in LOWRANK_METHODS:
        raise ConfigError(
            f"method.int8_weights={me.int8_weights} is for the low-rank methods ({', '.join(LOWRANK_METHODS)}), "
            f"whose updates petra's own optimizers write; not {me.name}"
        )
    if not (16 <= me.int8_block <= 4096 and me.int8_block & (me.int8_block - 1) == 0):
        raise ConfigError(f"method.int8_block must be a power of two from 16 to 4096 (got {me.int8_block})")
    if me.moments != "auto" and (me.name.endswith("8bit") or me.name in ("galore-adafactor", "adam-mini")):
        why = "keeps 8-bit moments" if me.name.endswith("8bit") else "keeps its own (factored or per-block) state"
        raise ConfigError(f"method.moments={me.moments} does not apply to {me.name}, which {why}; leave it at auto")


def validate(cfg: RunConfig) -> None:
    """Each section checks itself; then what spans sections."""
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_train(cfg.train)
    validate_method(cfg.method, cfg.model, cfg.preset)
    if cfg.method.int8_weights != "off" and cfg.train.compile == "on":
        raise ConfigError(
            "method.int8_weights runs eagerly (its weights are a tensor subclass torch.compile does not take); "
            "use train.compile=auto or off"
        )
    if cfg.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.seq_len} is longer than the model allows "
            f"(model.max_position_embeddings={cfg.model.max_position_embeddings})"
        )


# fields that may differ when resuming; anything else must match the saved run
RESUMABLE_CHANGES = {
    ("train", k)
    for k in (
        "stop_after",
        "device",
        "compile",
        "kernels",
        "eval_every",
        "save_every",
        "log_every",
        "parallel",
        "log_to",
        "threads",
        "keep_checkpoints",
        "sample_every",
        "sample_prompt",
    )
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, requested: dict) -> list[str]:
    """'field: saved -> requested' for every setting in which two saved configs (to_dict)
    differ, except those a resume may change."""
    may = {f"{s}.{k}" for s, k in RESUMABLE_CHANGES}
    old, new = _flat(saved), _flat(requested)
    out = []
    for k in sorted(set(old) | set(new), key=lambda k: (k != "preset", k)):  # the preset first: it says most
        if k in may or old.get(k) == new.get(k):
            continue
        if k == "model.vocab_size" and (old.get(k) or 0) > (new.get(k) or 0):
            continue  # raised by the run to fit its tokenizer
        out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return out


def merge_resume_config(saved: RunConfig, requested: RunConfig | None, explicit: set[tuple[str, str]]) -> RunConfig:
    """The saved config, with the few fields a resume may change taken from the request."""
    saved.train.stop_after = 0  # a stop is one-shot: the resumed run goes on unless told again
    if requested is None:
        return saved
    for section, key in explicit:
        new = getattr(getattr(requested, section), key)
        old = getattr(getattr(saved, section), key)
        if new == old:
            continue
        if (section, key) not in RESUMABLE_CHANGES:
            allowed = ", ".join(f"{s}.{k}" for s, k in sorted(RESUMABLE_CHANGES))
            raise ConfigError(
                f"cannot resume with {section}.{key}={new!r}: the run was started with {old!r}. "
                f"A resume may change only: {allowed}"
            )
        setattr(getattr(saved, section), key, new)
    validate(saved)
    return saved


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of cfg with some section fields changed (used by compare)."""
    out = from_dict(json.loads(cfg.to_json()))
    for s, values in sections.items():
        setattr(out, s, dataclasses.replace(getattr(out, s), **values))
    validate(out)
    return out
