"""hf engine: transformers in-process; batched, length-bucketed, left-padded sampling with a KV cache.

The decode loop is written out (instead of `model.generate`) so that it records, for every
continuation, the exact token ids, the summed log-probability under the model (temperature 1,
whatever the sampling temperature) and whether it stopped at EOS, without keeping all logits.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from sipt.config import EngineConfig
from sipt.engines import BaseEngine, Generation, Sampling
from sipt.errors import SiptError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from `logits` (rows × vocab) under temperature, top-k and top-p."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform number per row (torch.multinomial draws one per vocabulary
    # entry, which cost as much as the model's matmuls on CPU).
    cdf = logits.float().softmax(-1).cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _repeat_cache(cache, n: int) -> None:
    """Repeat a filled static KV cache n times along the batch (the n samples share one prefill)."""
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(n, 0)
        layer.values = layer.values.repeat_interleave(n, 0)
        if hasattr(layer, "batch_size"):
            layer.batch_size *= n


class HFEngine(BaseEngine):
    name = "hf"

    def __init__(self, model_dir: str | Path, cfg: EngineConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not model_dir or not Path(model_dir, "config.json").exists():
            raise SiptError(f"{model_dir or '(empty)'}: not a Hugging Face model folder (no config.json)")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted({e for e in eos if e is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        # transformers 5.2x renamed `past_key_values` to `cache`; support both.
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.static = cfg.static_cache

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], s: Sampling) -> list[list[Generation]]:
        """`s.n` continuations of every prompt. Deterministic for the same prompts, order and seed.

        Prompts are sorted by length (similar lengths share a batch, little compute goes to
        padding) and each batch of `batch_size // n` prompts is prefilled once; the KV cache is then
        repeated n times, so the n continuations of a prompt share its prefix.
        """
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        gen = torch.Generator(device=self.device).manual_seed(s.seed)
        out: list[list[Generation]] = [[] for _ in prompts]
        per_batch = max(1, self.cfg.batch_size // max(1, s.n))
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            results = self._generate_batch([prompts[i] for i in batch], s, gen)
            for k, i in enumerate(batch):
                out[i] = results[k * s.n : (k + 1) * s.n]
        return out

    def _static_cache(self, length: int):
        if not self.static:
            return None
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=length)

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities of `token_ids` as the next token after each prompt (one forward pass
        per batch, only the last position's logits kept): the judge's logprob mode."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[float]] = [[] for _ in prompts]
        wanted = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(order), bs):
            batch = order[start : start + bs]
            ids, mask, positions = self._left_pad([prompts[i] for i in batch])
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **keep).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, wanted].cpu().tolist()
            for i, row in zip(batch, logp):
                out[i] = row
        return out

    def _left_pad(self, prompts: list[list[int]]):
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _generate_batch(self, prompts: list[list[int]], s: Sampling, gen) -> list[Generation]:
        """n continuations of each prompt, rows ordered prompt by prompt."""
        ids, mask, positions = self._left_pad(prompts)
        width = ids.shape[1]
        # A preallocated (static) KV cache: a growing cache re-copies every layer's keys and values
        # at each step, which dominated decoding time on CPU.
        past = self._static_cache(width + s.max_new_tokens)
        shared = s.n > 1 and past is not None
        if s.n > 1 and not shared:  # no cache to repeat: prefill every copy
            ids, mask, positions = (t.repeat_interleave(s.n, 0) for t in (ids, mask, positions))
        extra = {self.cache_kw: past, "cache_position": torch.arange(width, device=self.device)} if past is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        past, logits = getattr(out, self.cache_kw), out.logits[:, -1, :]
        if shared:
            _repeat_cache(past, s.n)
            mask, positions, logits = (t.repeat_interleave(s.n, 0) for t in (mask, positions, logits))
        b = mask.shape[0]
        eos = torch.tensor(self.eos_ids, device=self.device) if (s.stop_at_eos and self.eos_ids) else None
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(b, dtype=torch.bool, device=self.device)
        logprob = torch.zeros(b, dtype=torch.float32, device=self.device)
        tokens = []
        pos = positions[:, -1:]
        for step in range(s.max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            nxt = sample_next(logits, s, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            logprob += torch.where(done, 0.0, logp.gather(-1, nxt[:, None]).squeeze(-1))
            tokens.append(nxt)
            if eos is not None:
                hit = ~done & torch.isin(nxt, eos)
                stopped |= hit
                done |= hit
            if bool(done.all()) or step == s.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], dim=1)
            pos = pos + 1
            extra = {self.cache_kw: past}
            if self.static:
                extra["cache_position"] = torch.tensor([width + step], device=self.device)
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                             use_cache=True, **extra)
            past, logits = getattr(out, self.cache_kw), out.logits[:, -1, :]
        gen_ids = torch.stack(tokens, dim=1).cpu().tolist()
        results = []
        for r in range(b):
            seq = gen_ids[r]
            if bool(stopped[r]):
                seq = seq[: next(k for k, t in enumerate(seq) if t in self.eos_ids) + 1]
            text = self.tokenizer.decode(seq, skip_special_tokens=True)
            results.append(Generation(seq, text, float(logprob[r]), "stop" if bool(stopped[r]) else "length"))
        return results
