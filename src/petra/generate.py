"""`petra generate`: text from a trained model, a run directory or an export.

The prompt is run once to fill a KV cache; every new token is then one forward of one
position. Sampling: greedy at temperature 0, else softmax(logits / temperature) restricted
to the top-k tokens and to the smallest set whose probability reaches top-p, drawn with a
seeded generator (the same seed, the same text on the same device).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint, hf
from .config import ConfigError, ModelConfig, from_dict
from .model import KVCache, LlamaForCausalLM, build_model
from .tokenizer import Tokenizer


def load(source: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model and tokenizer of a petra run directory (its last checkpoint, any method,
    ReLoRA merged) or of an export directory (model.safetensors, config.json, tokenizer)."""
    path = Path(source).expanduser()
    if checkpoint.exists(path):
        payload = checkpoint.load_consolidated(path)
        weights = checkpoint.plain_state_dict(payload)
        cfg = from_dict(payload["config"]).model
        tok = checkpoint.run_tokenizer(path, payload)
    elif hf.is_hf(path):  # petra's export, or any Hugging Face Llama
        weights = hf.weights(path)
        cfg = ModelConfig(**hf.model_fields(path))
        tok = hf.tokenizer(path)
    else:
        raise ConfigError(
            f"{str(source)!r} is neither a petra run directory (with a checkpoint) nor a Hugging Face Llama "
            "directory (config.json and model.safetensors, or sharded safetensors)"
        )
    if tok is None or not Path(tok).is_file():
        raise ConfigError(f"{str(source)!r} has no tokenizer (tokenizer.json or tokenizer.model)")
    cfg.vocab_size = weights["model.embed_tokens.weight"].shape[0]  # raised to the tokenizer's by the run
    cfg.intermediate_size = weights["model.layers.0.mlp.up_proj.weight"].shape[0]  # padded or not
    cfg.pad_intermediate_to, cfg.activation_checkpointing = 0, False
    model = build_model(cfg, device, dtype)
    checkpoint.load_initial(model, weights, str(source))
    return model.eval(), Tokenizer(Path(tok))


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int, samples: int = 1) -> None:
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1")
    if not temperature >= 0:
        raise ConfigError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k} must be >= 0 (0 = no limit)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p} must be in (0, 1]")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None):
    """The next token of each row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep a token while the mass before it is under top_p (the first one always)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids after `prompt` (stopping after EOS, which is included)."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    limit = model.config.max_position_embeddings
    if not prompt:
        raise ConfigError("the prompt is empty; give --prompt some text")
    if len(prompt) >= limit:
        raise ConfigError(
            f"the prompt is {len(prompt)} tokens; the model's context is {limit} tokens "
            f"(max_position_embeddings): shorten --prompt to leave room for new tokens"
        )
    if len(prompt) + max_new_tokens > limit:
        raise ConfigError(
            f"the prompt ({len(prompt)} tokens) and --max-new-tokens {max_new_tokens} exceed the model's "
            f"context of {limit} tokens (max_position_embeddings); ask for at most {limit - len(prompt)}"
        )
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, model.lm_head.weight.dtype)
    logits = model.next_logits(torch.tensor([prompt], device=device), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, gen)
        out.append(int(token))
        if out[-1] == eos_id:
            break
        logits = model.next_logits(token[:, None], cache)
    return out


class Sampler:
    """Greedy samples during training, every `every` steps (and none when 0): what the model
    says to the same prompt as it trains, printed and logged beside the losses."""

    def __init__(self, every: int, prompt: str, tok: Tokenizer, val_tokens, new_tokens: int = 32):
        self.every, self.tok, self.new_tokens = every, tok, new_tokens
        ids = tok.encode_documents([prompt])[0][:-1].tolist() if prompt else [int(t) for t in val_tokens[:8]]
        self.prompt = ids

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    @torch.no_grad()
    def run(self, model: LlamaForCausalLM) -> str:
        was = model.training
        model.eval()
        n = min(self.new_tokens, model.config.max_position_embeddings - len(self.prompt))
        out = generate(model, self.prompt, max(1, n), eos_id=self.tok.eos_id)
        model.train(was)
        return self.tok.decode(self.prompt + out)
