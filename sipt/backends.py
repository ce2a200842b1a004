"""Judge backends: what answers a judge call, the toy world's oracle or a model on an engine.

A backend has `model` (its part of the cache key), `mode` ("generate" or "logprob"),
`identity(call)` (the prompt and sampling that key a call), `run(calls, done)` (answer the calls,
`done(call)` as each is answered) and `close()`. `make_backend` builds the one a [judge] section names.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sipt.engines import ENGINES, Generation, Sampling, encode_prompts, make_engine
from sipt.errors import SiptError
from sipt.objectives import OBJECTIVES, load_template, render

if TYPE_CHECKING:
    from sipt.judging import Call



class OracleBackend:
    """The toy world's exact judge (sipt.oracle): raw responses in the verdict formats of an LLM."""

    mode = "generate"

    def __init__(self, kb_path: Path, noise: float = 0.0):
        from sipt.artifacts import content_fingerprint
        from sipt.oracle import ORACLE_VERSION, OracleJudge

        self.base = OracleJudge(kb_path, noise=noise, seed=0)
        # keyed by the knowledge base's bytes: a copied or moved run (and its world) reuses its cache
        self.model = f"oracle-v{ORACLE_VERSION}:{content_fingerprint(Path(kb_path))}:noise={noise}"
        self._by_seed: dict[int, object] = {}

    def identity(self, c: Call) -> tuple[str, dict]:
        return json.dumps([c.objective, c.prefix, c.texts, c.reference]), {}

    def _judge(self, seed: int):
        if seed not in self._by_seed:  # copies share the KB and the analysis cache; only the seed differs
            j = copy.copy(self.base)
            j.seed = seed
            self._by_seed[seed] = j
        return self._by_seed[seed]

    def run(self, calls: list[Call], done: Callable[[Call], None]) -> None:
        for c in calls:
            c.response = self._judge(c.seed).respond(c.objective, c.prefix, list(c.texts), c.reference)
            done(c)

    def close(self) -> None:
        pass


class EngineBackend:
    """A model judge on any engine of sipt.engines: generate mode or logprob mode."""

    def __init__(self, engine, model_id: str, templates: dict[str, str], mode: str, chat: bool,
                 temperature: float, top_p: float, max_new_tokens: int):
        self.engine, self.model, self.templates, self.mode, self.chat = engine, model_id, templates, mode, chat
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self._options: dict[str, tuple[list[int], list[int]]] = {}

    def prompt(self, c: Call) -> str:
        if len(c.texts) == 2:
            return render(self.templates[c.objective], prefix=c.prefix, option_1=c.texts[0], option_2=c.texts[1])
        return render(self.templates[c.objective], prefix=c.prefix, candidate=c.texts[0], reference=c.reference)

    def identity(self, c: Call) -> tuple[str, dict]:
        if self.mode == "logprob":
            o = OBJECTIVES[c.objective]
            return self.prompt(c), {"mode": "logprob", "chat": self.chat, "answer": o.answer_prefix,
                                    "options": [t for t, _ in o.options]}
        return self.prompt(c), {"mode": "generate", "chat": self.chat, "temperature": self.temperature,
                                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}

    def run(self, calls: list[Call], done: Callable[[Call], None]) -> None:
        """Answer `calls`, calling `done` (in this thread) as each is answered; how many run at once
        is the engine's business (`Engine.generate_many`)."""
        if self.mode == "logprob":
            for objective in sorted({c.objective for c in calls}):
                group = [c for c in calls if c.objective == objective]
                self._logprobs(objective, group)
                for c in group:
                    done(c)
            return
        s = Sampling(n=1, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

        def answered(i: int, gens: list[Generation]) -> None:
            c = calls[i]
            c.response, c.error = gens[0].text, gens[0].error
            done(c)

        self.engine.generate_many([c.prompt for c in calls], [c.seed for c in calls], s, self.chat, answered)

    def option_tokens(self, objective: str) -> tuple[list[int], list[int]]:
        """(token ids of the forced answer prefix, first token id of each option after it)."""
        if objective not in self._options:
            try:
                self._options[objective] = verdict_tokens(self.engine.tokenizer, objective)
            except SiptError as e:
                raise SiptError(f"judge.mode = 'logprob': {e}; use mode = 'generate'") from None
        return self._options[objective]

    def _logprobs(self, objective: str, calls: list[Call]) -> None:
        head, firsts = self.option_tokens(objective)
        ids = logprob_prompt_ids(self.engine.tokenizer, [c.prompt for c in calls], self.chat)
        rows = self.engine.next_token_logprobs([[*p, *head] for p in ids], firsts)
        names = [t for t, _ in OBJECTIVES[objective].options]
        for c, row in zip(calls, rows):
            c.response = json.dumps({n.strip(): round(lp, 6) for n, lp in zip(names, row)})

    def close(self) -> None:
        self.engine.close()


def verdict_tokens(tok, objective: str) -> tuple[list[int], list[int]]:
    """How logprob mode reads a verdict: (the token ids of the forced answer prefix, the first token id
    of each option after it). The forced answer is the tokens all options share ("Conclusion: Option"
    and, where a tokenizer splits " 1" into " " + "1", the space); each option is its next token."""
    o = OBJECTIVES[objective]
    fulls = [tok(o.answer_prefix + text, add_special_tokens=False).input_ids for text, _ in o.options]
    k = min(_common(full, fulls[0]) for full in fulls)
    head, firsts = fulls[0][:k], [full[k] if k < len(full) else -1 for full in fulls]
    if -1 in firsts or len(set(firsts)) != len(firsts):
        raise SiptError(f"the {objective} verdict options {[t for t, _ in o.options]} do not begin with "
                        "distinct tokens in this model's tokenizer")
    return head, firsts


def logprob_prompt_ids(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of judge prompts as logprob mode feeds them (the answer prefix follows): a chat
    turn, or the plain prompt and a newline."""
    return encode_prompts(tok, prompts if chat else [p + "\n" for p in prompts], chat)


def _common(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def make_backend(run_dir: Path, j, temperature: float | None = None):
    """The judge backend a [judge] section names: the toy world's oracle or a model on an engine.
    `temperature` overrides the section's (the eval stage judges at its own temperature)."""
    if j.engine == "oracle":
        from sipt.world import oracle_kb

        return OracleBackend(oracle_kb(j.world, run_dir, "judge", "judge.world"), j.noise)
    from sipt import artifacts
    templates = {o: load_template(o, j.templates.get(o, "")) for o in OBJECTIVES}
    engine = make_engine(j)
    model_id = j.model  # in the cache key: a folder by its files' contents (wherever it is), a server by its address
    if Path(j.model, "config.json").exists():
        model_id = f"folder@{artifacts.content_fingerprint(Path(j.model))}"
    elif ENGINES[j.engine].served:
        model_id = f"{j.base_url}|{j.model}"
    return EngineBackend(engine, model_id, templates, j.mode, j.chat,
                         j.temperature if temperature is None else temperature, j.top_p, j.max_new_tokens)

