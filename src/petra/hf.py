"""Hugging Face Llama checkpoints read as petra models: an export of petra's, or any
LlamaForCausalLM directory (config.json, model.safetensors or sharded safetensors with
model.safetensors.index.json, tokenizer.json or tokenizer.model) to start a run from
(`--init-from`), evaluate (`petra eval`) or sample (`petra generate`).

What petra's LLaMA cannot be is refused by name: grouped-query attention, biases, RoPE
scaling. Tied embeddings are untied (the head starts as a copy of the embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError

# transformers' LlamaConfig keys -> petra's ModelConfig fields
HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_hidden_layers": "num_hidden_layers",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "initializer_range": "init_std",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_hf(path: Path) -> bool:
    """A directory with a transformers config.json and safetensors weights."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def model_fields(path: Path) -> dict:
    """petra's ModelConfig fields of a Llama checkpoint's config.json."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    kind = hf.get("model_type")
    if kind != "llama":
        raise ConfigError(f"{path} holds a {kind!r} model; petra trains LLaMA models (model_type 'llama')")
    heads = hf.get("num_attention_heads")
    why = []
    if hf.get("num_key_value_heads", heads) != heads:
        why.append(f"grouped-query attention ({hf['num_key_value_heads']} key/value heads for {heads})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        why.append("biases in attention or MLP")
    if hf.get("rope_scaling"):
        why.append(f"RoPE scaling ({hf['rope_scaling']})")
    if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
        why.append(f"head_dim {hf['head_dim']} other than hidden_size / heads")
    if why:
        raise ConfigError(f"{path} is a LLaMA petra's model cannot hold: {'; '.join(why)}")
    return {ours: hf[k] for k, ours in HF_KEYS.items() if k in hf}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of model.safetensors or of every shard an index names; a tied head
    (no lm_head.weight) is the embedding, copied."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(path / f)))
    else:
        out = load_file(str(path / "model.safetensors"))
    out = {k: v for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}  # older files keep RoPE's buffer
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def tokenizer(path: Path) -> Path | None:
    return next((Path(path) / f for f in TOKENIZER_FILES if (Path(path) / f).is_file()), None)
