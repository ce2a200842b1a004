"""openai engine: any OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp).

Requests run in a bounded thread pool (`concurrency`), each with a timeout, and are retried with
exponential backoff and jitter on 429, 5xx and connection errors. The API key is read from the
environment variable named by `api_key_env` and never appears in logs, manifests or errors.
Token-id prompts go to /v1/completions; with vLLM servers the continuation's exact token ids come
back (`return_tokens_as_token_ids`), otherwise the text is tokenized locally (recorded per row).
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from sipt.config import EngineConfig
from sipt.engines import BaseEngine, Generation, Sampling
from sipt.errors import SiptError, StageInterrupted

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerError(StageInterrupted):
    """The server could not be reached or kept failing after every retry."""


class RequestRejected(ServerError):
    """The server answered one request with a client error (4xx other than a retryable one, e.g.
    a prompt longer than its context): that request fails, the stage goes on."""


class OpenAIEngine(BaseEngine):
    name = "openai"

    def __init__(self, model: str, cfg: EngineConfig, tokenizer_dir: str | Path | None = None):
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise SiptError(f"base_url = {cfg.base_url!r}: expected http(s)://host:port/v1")
        self.api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.tokenizer = None
        local = tokenizer_dir or (model if model and Path(model, "config.json").exists() else None)
        if local:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = model if not local else self._served_name(str(local))

    def close(self) -> None:
        pass

    def _served_name(self, local: str) -> str:
        """The server's name for a local model folder: the one it serves, if it serves just one."""
        try:
            models = self._request("GET", "/models", None)["data"]
        except ServerError:
            return local
        ids = [m["id"] for m in models]
        if local in ids or len(ids) != 1:
            return local
        return ids[0]

    # -- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    kind = RequestRejected if 400 <= e.code < 500 and e.code not in (401, 403, 404) else ServerError
                    raise kind(f"{url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.cfg.max_retries:
                time.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise ServerError(f"{url}: no answer after {self.cfg.max_retries + 1} tries ({last})")

    # -- generation ------------------------------------------------------------------------
    def _complete(self, prompt, s: Sampling, seed: int) -> list[Generation]:
        body = {
            "model": self.model, "prompt": prompt, "n": s.n, "max_tokens": s.max_new_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "seed": seed, "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        if s.top_k:
            body["top_k"] = s.top_k
        if not s.stop_at_eos:
            body["ignore_eos"] = True
        try:
            resp = self._request("POST", "/completions", body)
        except RequestRejected as e:
            return _failed(s.n, str(e))
        return [self._generation(c) for c in sorted(resp["choices"], key=lambda c: c.get("index", 0))]

    def _generation(self, choice: dict) -> Generation:
        text = choice.get("text", "")
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            ids = [int(t.split(":", 1)[1]) for t in tokens]
        elif self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            raise SiptError(f"{self.base}: the server returned no token ids (return_tokens_as_token_ids) and "
                            "no tokenizer is loaded to recover them: set the engine's model to the local "
                            "model folder the server serves, or serve with vLLM")
        steps = lp.get("token_logprobs")
        # A missing log-probability stays None (training then recomputes it), never 0.0.
        logprob = float(sum(steps)) if steps and all(x is not None for x in steps) else None
        reason = "stop" if choice.get("finish_reason") == "stop" else "length"
        if reason == "stop" and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            if not ids or ids[-1] != self.tokenizer.eos_token_id:
                ids = [*ids, self.tokenizer.eos_token_id]
        return Generation(ids, text, logprob, reason)

    def generate(self, prompts: list[list[int]], s: Sampling) -> list[list[Generation]]:
        """`s.n` continuations of each token-id prompt; request k is seeded with seed + k."""
        return self._each(prompts, [s.seed + k for k in range(len(prompts))], s, self._complete)

    def generate_text(self, prompts: list[str], s: Sampling, chat: bool = False) -> list[list[Generation]]:
        """As `generate` for text prompts; with `chat`, through /v1/chat/completions."""
        return self.generate_many(prompts, [s.seed + k for k in range(len(prompts))], s, chat)

    def generate_many(self, prompts: list[str], seeds: list[int], s: Sampling, chat: bool = False,
                      done: Callable[[int, list[Generation]], None] | None = None) -> list[list[Generation]]:
        """One request per prompt, `concurrency` in flight, prompt i seeded with seeds[i] mod 2**31;
        `done` runs in the caller's thread as each request is answered."""
        return self._each(prompts, seeds, s, self._chat if chat else self._complete, done)

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities of `token_ids` as the next token after each token-id prompt (the judge's
        logprob mode): /v1/completions with max_tokens=1 and the top-20 log-probabilities; a token
        outside them is scored exactly by echoing prompt + token (`echo`, prompt log-probabilities)."""
        if self.tokenizer is None:
            raise SiptError("logprob mode on the openai engine needs the model's tokenizer: set the judge's "
                            "model to a local model folder (the one the server serves)")
        names = {t: self.tokenizer.decode([t]) for t in token_ids}

        def one(item):
            prompt, _ = item
            body = {"model": self.model, "prompt": list(prompt), "max_tokens": 1, "temperature": 0.0,
                    "logprobs": 20, "return_tokens_as_token_ids": True}
            top = (self._request("POST", "/completions", body)["choices"][0].get("logprobs") or {})
            top = (top.get("top_logprobs") or [{}])[0] or {}
            by_id = {}
            for key, lp in top.items():
                if key.startswith("token_id:"):
                    by_id[int(key.split(":", 1)[1])] = lp
            row = []
            for t in token_ids:
                lp = by_id.get(t, top.get(names[t]) if not by_id else None)
                if lp is None:  # outside the top 20: score prompt + [t] exactly
                    body = {"model": self.model, "prompt": [*prompt, t], "max_tokens": 1, "echo": True,
                            "logprobs": 0, "temperature": 0.0}
                    lps = self._request("POST", "/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
                    lp = lps[len(prompt)]
                row.append(float(lp))
            return row

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(one, [(p, k) for k, p in enumerate(prompts)]))

    def _chat(self, prompt: str, s: Sampling, seed: int) -> list[Generation]:
        body = {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "n": s.n,
            "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": seed,
        }
        try:
            resp = self._request("POST", "/chat/completions", body)
        except RequestRejected as e:
            return _failed(s.n, str(e))
        gens = []
        for choice in sorted(resp["choices"], key=lambda c: c.get("index", 0)):
            text = (choice.get("message") or {}).get("content") or ""
            # chat answers are used as text (rewrites are re-tokenized by the rewrite stage)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids if self.tokenizer else []
            gens.append(Generation(ids, text, None, "stop" if choice.get("finish_reason") == "stop" else "length"))
        return gens

    def _each(self, prompts: list, seeds: list[int], s: Sampling, fn, done=None) -> list[list[Generation]]:
        """fn(prompt, s, seed) for every prompt on the thread pool, answers in prompt order."""
        out: list[list[Generation]] = [[] for _ in prompts]
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            futures = {pool.submit(fn, p, s, seed % (2**31)): i for i, (p, seed) in enumerate(zip(prompts, seeds))}
            try:
                for f in as_completed(futures):
                    i = futures[f]
                    out[i] = f.result()
                    if done is not None:
                        done(i, out[i])
            except BaseException:
                for f in futures:  # a server that fails (or Ctrl-C) stops the requests not yet sent
                    f.cancel()
                raise
        return out


def _failed(n: int, why: str) -> list[Generation]:
    """The n continuations of a request the server rejected: no tokens, the reason in `error`."""
    return [Generation([], "", None, "error", error=why) for _ in range(n)]
