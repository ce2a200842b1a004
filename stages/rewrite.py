"""rewrite: the teacher rewrites each suffix of the iteration's slice into a better training target.

The prompt follows the paper (§5.1): the continuation block before the context block, with the
last words of the prefix (`prefix_ending`) prepended to both the suffix and the rewrite, so the
rewriter continues the prefix smoothly. The prefix ending is stripped from the answer, which is then
cut to the suffix length in policy tokens. `copied` records a verbatim copy of the suffix (what a
good rewriter does with a good suffix). An answer that repeats the prompt (the whole prefix, or a
line of the template's own text) is an error, not a rewrite. The `oracle` engine is the toy world's
exact rewriter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from sipt import artifacts
from sipt.config import Config, check_model
from sipt.engines import Sampling, make_engine
from sipt.errors import SiptError
from sipt.executor import run_parts
from sipt.rewrite_reward import echoes, template_fragments
from sipt.rewriter import clean_answer, finish_rewrite, load_template, prefix_ending, rewrite_prompt  # noqa: F401
from sipt.samples import derive_seed, iteration_samples
from sipt.world import oracle_inputs, oracle_kb

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("rewrite_text", pa.string()),
        ("rewrite_ids", pa.list_(pa.int32())),  # policy tokens, at most data.suffix_tokens
        ("copied", pa.bool_()),  # the rewrite is the suffix, verbatim
        ("truncated", pa.bool_()),  # the answer was longer than the suffix length and was cut
        ("response", pa.string()),  # the rewriter's raw answer
        ("error", pa.string()),
    ]
)
SECTIONS = ["run.seed", "run.prompts_per_iter", "data.suffix_tokens", "rewrite"]


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work (and before the command freezes its config)."""
    rw = cfg.rewrite
    load_template(rw.template)
    if rw.engine == "oracle":
        oracle_kb(rw.world, run_dir, "rewriter", "rewrite.world")
    else:
        check_model("rewrite", rw)


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    rw = cfg.rewrite
    check(cfg, run_dir)
    policy = artifacts.stage_dir(run_dir, "policy", iteration)
    inputs = {"samples": "samples"}
    if rw.engine == "oracle":
        kb = oracle_kb(rw.world, run_dir, "rewriter", "rewrite.world")
        inputs.update(oracle_inputs(rw.world, run_dir, "rewriter", "rewrite.world"))
    elif not rw.model:
        raise SiptError("rewrite.model is empty: name the rewriter model (a folder, or the served name for openai)")
    stage = artifacts.Stage.of(run_dir, "rewrite", cfg, SECTIONS, iteration=iteration, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        samples, _ = iteration_samples(run_dir, iteration, cfg.run.prompts_per_iter,
                                       columns=["sample_id", "prefix_text", "suffix_text"])
        rows = samples.to_pylist()
        per_part = cfg.rollout.prompts_per_part
        parts = [rows[k : k + per_part] for k in range(0, len(rows), per_part)]
        job = RewriteJob(cfg, iteration, str(policy), parts, str(kb) if rw.engine == "oracle" else "")
        ran = run_parts(job, stage.tmp, cfg.run, label=f"rewrite iter {iteration}", unit="suffixes",
                        show_progress=show_progress)
        stats = stage.collected_stats()
        stats = {k: int(v) for k, v in stats.items()}
        stats.update(executor=ran["executor"], workers=ran["workers"])
        stats["copied_rate"] = round(stats.get("copied", 0) / max(1, stats.get("rewrites", 1)), 4)
        return stage.commit(stats, errors=stats.get("errors", 0))


@dataclass
class RewriteJob:
    """The rewrites of one part: built here, run by any executor (sipt/executor.py)."""

    cfg: Config
    iteration: int
    policy: str  # its tokenizer cuts rewrites to the suffix length in policy tokens
    parts: list
    kb: str  # the oracle's knowledge base ("" for a model rewriter)
    families = ("part",)

    def open(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.policy)
        self.engine = self.rewriter = None
        if self.kb:
            from sipt.oracle import OracleRewriter

            self.rewriter = OracleRewriter(self.kb)
        else:
            self.engine = make_engine(self.cfg.rewrite)
            self.template = load_template(self.cfg.rewrite.template)
            self.fragments = template_fragments(self.template)

    def weight(self, k: int) -> int:
        return len(self.parts[k])

    def part(self, k: int):
        rw, part, n_suffix = self.cfg.rewrite, self.parts[k], self.cfg.data.suffix_tokens
        endings = [prefix_ending(r["prefix_text"], rw.prefix_ending_words) for r in part]
        if self.rewriter is not None:
            answers = [self.rewriter.rewrite(r["prefix_text"], r["suffix_text"]) for r in part]
            errors = [""] * len(part)
        else:
            prompts = [rewrite_prompt(self.template, r["prefix_text"], r["suffix_text"], e, n_suffix)
                       for r, e in zip(part, endings)]
            s = Sampling(n=1, temperature=rw.temperature, top_p=rw.top_p,
                         max_new_tokens=self.cfg.new_tokens("rewrite"),
                         seed=derive_seed(self.cfg.run.seed, "rewrite", self.iteration, k))
            gens = [g[0] for g in self.engine.generate_text(prompts, s, chat=rw.chat)]
            answers = [g.text for g in gens]
            errors = [g.error or ("the rewriter repeated the prompt" if echoes(a, r["prefix_text"], self.fragments)
                                  else "") for g, a, r in zip(gens, answers, part)]
        table, stats = _table(part, endings, answers, errors, self.tok, n_suffix, self.rewriter is None)
        return [("part", table, stats)]

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None


def _table(part, endings, answers, errors, tok, n_suffix: int, strip: bool) -> tuple[pa.Table, dict]:
    cols = {name: [] for name in SCHEMA.names}
    stats = {"rewrites": 0, "copied": 0, "truncated": 0, "errors": 0, "empty": 0}
    for row, ending, answer, error in zip(part, endings, answers, errors):
        text, ids, cut = finish_rewrite(answer, ending, tok, n_suffix, strip)
        if not text.strip() and not error:
            error = "empty rewrite"
        cols["sample_id"].append(row["sample_id"])
        cols["rewrite_text"].append(text)
        cols["rewrite_ids"].append(ids)
        cols["copied"].append(text == row["suffix_text"])
        cols["truncated"].append(cut)
        cols["response"].append(answer)
        cols["error"].append(error)
        stats["rewrites"] += 1
        stats["copied"] += text == row["suffix_text"]
        stats["truncated"] += cut
        stats["errors"] += bool(error)
        stats["empty"] += error == "empty rewrite"
    return pa.table(cols, schema=SCHEMA), stats
