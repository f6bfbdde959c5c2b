"""Checkpoints: atomic save, exact resume, export to Hugging Face format.

A run directory holds config.json, metrics.jsonl and checkpoint.pt. checkpoint.pt is written
to a temporary name and renamed, so a kill at any moment leaves the previous one usable.
It holds everything needed to continue exactly: model, optimizer state (GaLore projectors
included), method state (ReLoRA cycle), step, RNG states and the resolved config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import reshard
from .config import ConfigError
from .health import TrainingError
from .hf import TOKENIZER_FILES  # a run's own copy of its tokenizer: BPE or SentencePiece
from .int8weights import Int8Weight
from .lora import merged_state_dict

CKPT = "checkpoint.pt"
SHARDED = "checkpoint-sharded"  # FSDP2 runs: one file per process, rank00000.pt ...
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _write(obj: dict, tmp: Path) -> None:
    """torch.save to tmp; a failed write (a full disk raises RuntimeError from torch's zip
    writer, not OSError) leaves no partial file and one clear error."""
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing {tmp.parent / CKPT} failed ({str(e).splitlines()[0][:200]})") from None


def save(run_dir: Path, payload: dict) -> Path:
    run_dir = Path(run_dir)
    path, tmp = run_dir / CKPT, run_dir / (CKPT + ".tmp")
    _write({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    for old in (SHARDED, SHARDED + ".old"):  # an FSDP2 checkpoint of this run, now older (resharded)
        shutil.rmtree(run_dir / old, ignore_errors=True)
    return path


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / CKPT).is_file() or _sharded_dir(run_dir) is not None


def _sharded_dir(run_dir: Path) -> Path | None:
    """The sharded checkpoint, or the previous one if a save died between its two renames."""
    for name in (SHARDED, SHARDED + ".old"):
        d = Path(run_dir) / name
        if d.is_dir() and any(d.glob("rank*.pt")):
            return d
    return None


def save_sharded(run_dir: Path, payload: dict, d) -> Path:
    """Every process writes its shard into a fresh directory, which then replaces the old
    one by renames, so a kill at any moment leaves a complete checkpoint (new or old)."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / SHARDED, run_dir / (SHARDED + ".tmp"), run_dir / (SHARDED + ".old")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    _write({"format_version": FORMAT_VERSION, "world": d.world, **payload}, tmp / f"rank{d.rank:05d}.pt")
    d.barrier()
    if d.main:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        (run_dir / CKPT).unlink(missing_ok=True)  # a whole checkpoint of this run, now older (resharded)
    d.barrier()
    return final


def load(run_dir: Path, map_location="cpu", rank: int = 0, world: int = 1, sharded: bool = False) -> dict:
    """The checkpoint this process resumes from: checkpoint.pt, or its own FSDP2 shard where
    `world` FSDP2 processes saved it. Saved another way (by another number of FSDP2
    processes, or whole for an FSDP2 run) it is every saved part, memory-mapped, under
    "parts" (beside the first part's other entries): `reshard` takes this process's share."""
    run_dir = Path(run_dir)
    path, sdir = run_dir / CKPT, _sharded_dir(run_dir)
    n = len(list(sdir.glob("rank*.pt"))) if sdir is not None else 0  # processes that saved it
    if sharded and n == world:
        return _read(sdir / f"rank{rank:05d}.pt", map_location)
    if not sharded and (path.is_file() or sdir is None):
        return _read(path, map_location)
    if sdir is None:
        parts = [_read(path, map_location, mmap=True)]
    else:
        parts = [_read(sdir / f"rank{r:05d}.pt", map_location, mmap=True) for r in range(n)]
    return {**parts[0], "parts": parts}


def run_config(run_dir: Path, warn=print) -> dict:
    """A run's config as saved: its config.json, or where that is missing or damaged (edited
    by hand, cut short) the copy its checkpoint holds, with a warning."""
    from .config import from_dict

    run_dir = Path(run_dir)
    try:
        d = json.loads((run_dir / "config.json").read_text())
        from_dict(d)  # every section and field there
        return d
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        warn(
            f"warning: {run_dir / 'config.json'} cannot be used ({type(e).__name__}: {str(e)[:80]}); "
            f"the config its checkpoint holds is used and written there again"
        )
    sdir = _sharded_dir(run_dir)
    path = run_dir / CKPT if (run_dir / CKPT).is_file() or sdir is None else sorted(sdir.glob("rank*.pt"))[0]
    try:  # mmap: the config, not the weights, is read
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"]
    except Exception as e:
        raise CheckpointError(
            f"{path} holds no readable config ({type(e).__name__}); the run cannot be resumed"
        ) from None


def load_consolidated(run_dir: Path) -> dict:
    """The checkpoint with the whole model (FSDP2 shards put together, without optimizer state)."""
    payload = load(run_dir)
    parts = payload.pop("parts", None)
    if parts:
        payload["model"] = reshard.model_state(None, parts, 0, 1)
        payload.pop("optimizer", None)
    return payload


def _read(path: Path, map_location, mmap: bool = False) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"{path.parent} is not a petra run directory with a checkpoint (no {path.name} "
            f"there); give the --out directory of a petra train run"
        )
    try:
        # weights_only=False: optimizer state may hold torchao 8-bit tensor subclasses;
        # checkpoints are files this program wrote for this user
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, wrong format, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {e}); it was left untouched"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a petra checkpoint of format {FORMAT_VERSION}")
    for key in ("step", "config", "model", "optimizer"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; it is corrupt or incomplete")
    return payload


def plain_state_dict(payload: dict) -> dict[str, torch.Tensor]:
    """The model's weights as a plain LLaMA state dict (ReLoRA factors merged, int8 weights
    dequantized)."""
    m = payload["config"]["method"]
    state = {k: v.dequantize() if isinstance(v, Int8Weight) else v for k, v in payload["model"].items()}
    return merged_state_dict(state, m["lora_alpha"] / m["rank"], m.get("quantize", "none"))


def initial_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Plain LLaMA weights to start a run from: a petra run directory (any method; ReLoRA
    factors merged, FSDP2 shards joined) or a Hugging Face Llama directory (petra's export or
    any LlamaForCausalLM: model.safetensors or sharded)."""
    from . import hf

    path = Path(source).expanduser()
    if exists(path):
        return plain_state_dict(load_consolidated(path))
    if hf.is_hf(path) or (path / "model.safetensors").is_file():
        return hf.weights(path)
    raise ConfigError(
        f"train.init_from={str(source)!r} is neither a petra run directory (with {CKPT}) "
        f"nor a Hugging Face Llama directory (model.safetensors, or shards and their index)"
    )


def load_initial(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` (from `initial_weights`) into `model`; every name and shape must match."""
    own = model.state_dict()
    bad = sorted(k for k in own if k not in weights or weights[k].shape != own[k].shape)
    extra = sorted(set(weights) - set(own))
    if bad or extra:
        k = (bad or extra)[0]
        raise ConfigError(
            f"train.init_from={source!r} does not fit this model: {k} "
            + (
                f"has shape {tuple(weights[k].shape)}, the model's is {tuple(own[k].shape)}"
                if k in weights and k in own
                else "is missing on one side"
            )
            + " (use the same preset and vocabulary)"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])


class Checkpointer:
    """Saves a run's checkpoints and decides when: every `every` steps and at `last_step`,
    or when asked. It never writes weights that are not finite (the last good checkpoint
    stays), and it knows what is on disk for the messages that tell the user."""

    def __init__(self, out: Path, parallel, every: int, last_step: int, saved_step: int | None, keep: int = 1):
        self.out, self.parallel, self.every, self.last_step = Path(out), parallel, every, last_step
        self.saved_step = saved_step  # the step of the checkpoint on disk, None before the first
        self.keep = keep  # checkpoints kept: checkpoint.pt and keep - 1 earlier ones

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == self.last_step

    def on_disk(self) -> str:
        if self.saved_step is None:
            return f"no checkpoint was saved in {self.out}"
        return f"the last good checkpoint in {self.out} (step {self.saved_step}) is intact"

    def save(self, step: int, model: torch.nn.Module, device: torch.device, state) -> None:
        """Write `state()` (called only once the weights are known to be finite)."""
        if not self.parallel.all_finite(model, device):
            raise TrainingError(
                f"the weights are not finite after step {step}; nothing was saved and "
                f"{self.on_disk()} (lower train.lr or raise train.grad_clip)"
            )
        self._keep_previous()
        try:
            self.parallel.save(self.out, state())
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {self.on_disk()}") from None
        self.saved_step = step

    def _keep_previous(self) -> None:
        """Before checkpoint.pt is replaced: a hard link to it under its step's name (no copy),
        and the oldest kept ones beyond `keep` removed. (FSDP2's sharded checkpoints keep one.)"""
        path = self.out / CKPT
        if self.keep <= 1 or self.saved_step is None or not path.is_file() or not self.parallel.main:
            return
        old = self.out / f"checkpoint-step{self.saved_step:07d}.pt"
        if not old.exists():
            os.link(path, old)
        kept = sorted(self.out.glob("checkpoint-step*.pt"))
        for f in kept[: max(0, len(kept) - (self.keep - 1))]:
            f.unlink()


def keep_tokenizer(run_dir: Path, source: Path, sha256: str) -> Path:
    """Copy the run's tokenizer into the run directory (once), so that export and generation
    never depend on a cache that may have moved; a copy there that is not that tokenizer
    (swapped by hand) stops the run."""
    from .prepare import file_sha256

    dest = Path(run_dir) / ("tokenizer.model" if Path(source).suffix == ".model" else "tokenizer.json")
    if dest.is_file() and file_sha256(dest) != sha256:
        raise ConfigError(
            f"{dest} is not the tokenizer this run trains with ({source}): it was replaced; restore it "
            f"(copy {source} there) or start a new run"
        )
    if not dest.is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    return dest


def run_tokenizer(run_dir: Path, payload: dict) -> Path | None:
    """The tokenizer a run trained with: its own copy, else the path it recorded; a file
    whose hash is not the one the checkpoint recorded is refused, not used."""
    from .prepare import file_sha256

    found = [Path(run_dir) / name for name in TOKENIZER_FILES if (Path(run_dir) / name).is_file()]
    tok = payload.get("tokenizer_path")
    found += [Path(tok)] if tok and Path(tok).is_file() else []
    if not found:
        return None
    want = payload.get("tokenizer_sha256")
    if want is not None and file_sha256(found[0]) != want:
        raise ConfigError(
            f"{found[0]} is not the tokenizer {run_dir} trained with (its sha256 differs from the one the "
            f"checkpoint recorded): it was replaced; restore the run's tokenizer"
        )
    return found[0]


def hf_config(model_cfg: dict, eos_id: int | None) -> dict:
    from .config import ModelConfig

    mc = ModelConfig(**model_cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.mlp_width,
        "num_hidden_layers": mc.num_hidden_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_attention_heads,
        "head_dim": mc.head_dim,
        "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": mc.rms_norm_eps,
        "rope_theta": mc.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": mc.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def export_hf(run_dir: Path, out_dir: Path, dtype: str = "float32", warn=print) -> Path:
    """config.json, generation_config.json and model.safetensors loadable by
    LlamaForCausalLM, with the run's tokenizer (tokenizer.json or a SentencePiece
    tokenizer.model) and its tokenizer_config.json for AutoTokenizer."""
    from safetensors.torch import save_file

    payload = load_consolidated(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--hf {out_dir} is not an empty directory; nothing was written there: choose a new one")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    weights = {k: v.to(tdtype).contiguous() for k, v in plain_state_dict(payload).items()}
    _check_shapes(weights, payload["config"]["model"], run_dir)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _like_a_new_file(out_dir / "model.safetensors")
    cfg = hf_config(payload["config"]["model"], payload.get("eos_id"))
    cfg["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    eos = payload.get("eos_id")
    # no max_length: transformers warns on every generate(max_new_tokens=...) when one is set
    gen = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok = run_tokenizer(run_dir, payload)
    if tok is None:
        warn(
            f"warning: the tokenizer of {run_dir} is neither in the run directory nor at "
            f"{payload.get('tokenizer_path')!r}: the export has no tokenizer"
        )
    else:
        _export_tokenizer(tok, out_dir, cfg["max_position_embeddings"])
    return out_dir


def _like_a_new_file(path: Path) -> None:
    """safetensors writes 0600; give the file the mode the user's umask gives the others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _check_shapes(weights: dict[str, torch.Tensor], model_cfg: dict, run_dir: Path) -> None:
    """The weights must be the model their config describes, or the export would not load."""
    from .config import ModelConfig
    from .model import LlamaForCausalLM

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in LlamaForCausalLM(ModelConfig(**model_cfg)).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit its own config: {k} is {got.get(k, 'missing')}, the config "
            f"says {want.get(k, 'no such weight')}; nothing was exported"
        )


def _export_tokenizer(tok: Path, out_dir: Path, context: int) -> None:
    """The tokenizer file and a tokenizer_config.json naming its special tokens (the
    end-of-text token also begins and pads: petra's corpora have no other), left padding
    for batched generation and the model's context as model_max_length."""
    from .tokenizer import Tokenizer

    t = Tokenizer(tok)
    conf = {"model_max_length": context, "padding_side": "left", "clean_up_tokenization_spaces": False}
    eos = t.token(t.eos_id)
    if t.sentencepiece:
        shutil.copyfile(tok, out_dir / "tokenizer.model")
        conf.update(
            tokenizer_class="LlamaTokenizer",
            bos_token=t.token(t.bos_id),
            eos_token=eos,
            unk_token=t.token(t.unk_id),
            pad_token=t.token(t.pad_id) or eos,
            add_bos_token=False,
            add_eos_token=False,
            legacy=False,
        )
    else:
        shutil.copyfile(tok, out_dir / "tokenizer.json")
        conf.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=eos, eos_token=eos, pad_token=eos)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=2))
