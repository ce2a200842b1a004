"""judge: score every candidate continuation of the iteration's prefixes (paper §6).

Candidates per prefix are any of the original suffix, its rewrite and the policy's rollouts
(`judge.candidates`). Each objective is judged by the oracle or a model (sipt/judging.py: templates,
parsers, schemes, cache), and a candidate's reward is the weighted sum of its objective scores.
Parts follow the rollout stage's (`rollout.prompts_per_part` prefixes, seeded by (run.seed,
iteration, part)); each writes `judgments-k` (one row per judge call) and then `scores-k` (one row
per candidate). Judge calls are cached in <run>/cache/judge.sqlite, so a rerun makes no new calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from sipt import artifacts, judging
from sipt.config import CANDIDATES, Config, check_model
from sipt.errors import SiptError
from sipt.executor import run_parts
from sipt.objectives import OBJECTIVES
from sipt.samples import derive_seed, iteration_samples
from sipt.world import oracle_inputs, oracle_kb

JUDGMENTS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("objective", pa.string()),
        ("candidate_1", pa.string()),  # the candidate in the first slot (Option 1 / A / the text judged)
        ("candidate_2", pa.string()),  # the second (pairwise); "" for pointwise objectives
        ("repeat", pa.int32()),
        ("attempt", pa.int32()),  # 0, then 1.. for re-asks after an unreadable response
        ("seed", pa.int64()),
        ("prompt_hash", pa.string()),  # the cache key: sha256(model, prompt, sampling, seed)
        ("response", pa.string()),  # raw response (logprob mode: the options' log-probabilities, JSON)
        ("verdict", pa.float32()),  # pairwise: share won by candidate_1; pointwise: the score; null if invalid
        ("valid", pa.bool_()),
        ("error", pa.string()),  # the engine's error for this call, if any
    ]
)


def scores_schema() -> pa.Schema:
    """One row per candidate; a float column per registered objective (sipt/objectives.py)."""
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("candidate", pa.string()),  # "suffix", "rewrite", "rollout:<idx>"
            ("source", pa.string()),  # "suffix" | "rewrite" | "rollout"
            ("rollout_idx", pa.int32()),  # -1 if not a rollout
            ("text", pa.string()),
            ("token_ids", pa.list_(pa.int32())),  # exact policy tokens (samples, rewrite or rollout)
            # cut at the token limit, so token_ids do not end with EOS; false: the text ended there (a
            # rollout stopped at EOS, or the suffix, or its uncut rewrite, ends the document) and EOS is last
            ("truncated", pa.bool_()),
            *[(name, pa.float32()) for name in OBJECTIVES],  # null: not judged, or no valid verdict
            ("comparisons", pa.int32()),  # pairwise comparisons behind the first pairwise objective's score
            ("reward", pa.float32()),  # sum of weight x score over judge.objectives; null if one is missing
            ("error", pa.string()),
        ]
    )


SCORES = scores_schema()  # with the built-in objectives
SECTIONS = ["run.seed", "run.prompts_per_iter", "rollout.prompts_per_part", "judge"]


def check(cfg: Config, run_dir: Path) -> None:
    """Everything about the [judge] section that can be checked before any work (and before the
    command freezes its config): values, templates, the judge model folder, the oracle's world."""
    j = cfg.judge
    for key, values, allowed in (("objectives", j.objectives, OBJECTIVES), ("candidates", j.candidates, CANDIDATES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values or len(set(values)) != len(values):
            raise SiptError(f"judge.{key} = {values!r}: use distinct values from {', '.join(allowed)}")
    for key, table in (("weights", j.weights), ("templates", j.templates)):
        bad = [k for k in table if k not in OBJECTIVES]
        if bad:
            raise SiptError(f"judge.{key}: unknown objective {bad[0]!r}; objectives are {', '.join(OBJECTIVES)}")
    if j.repeats < 1 or j.parse_retries < 0:
        raise SiptError("judge.repeats must be >= 1 and judge.parse_retries >= 0")
    if j.engine == "oracle" and j.mode == "logprob":
        raise SiptError("judge.mode = 'logprob' needs a model (engine hf, vllm or openai); the oracle answers in text")
    check_model("judge", j)
    for o in j.objectives:  # fail on a bad template before any work, whatever the engine
        judging.load_template(o, j.templates.get(o, ""))
    if j.engine == "oracle":
        oracle_kb(j.world, run_dir, "judge", "judge.world")


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    j = cfg.judge
    check(cfg, run_dir)
    inputs = {"samples": "samples"}
    if "rollouts" in j.candidates:
        inputs["rollout"] = artifacts.stage_ref("rollout", iteration)
    if "rewrite" in j.candidates:
        inputs["rewrite"] = artifacts.stage_ref("rewrite", iteration)
    if j.engine == "oracle":
        inputs.update(oracle_inputs(j.world, run_dir, "judge", "judge.world"))
    stage = artifacts.Stage.of(run_dir, "judge", cfg, SECTIONS, iteration=iteration, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        try:
            samples, _ = iteration_samples(run_dir, iteration, cfg.run.prompts_per_iter,
                                           columns=["sample_id", "prefix_text", "suffix_text", "suffix_ids",
                                                    "split_token", "doc_tokens", "rest_ids"])
        except KeyError:
            raise SiptError(f"{run_dir}/samples: no rest_ids column (made by an older sipt shard); "
                            "rerun `sipt shard --force`") from None
        rows = samples.to_pylist()
        extra = _candidates_by_sample(run_dir, iteration, j.candidates)
        per_part = cfg.rollout.prompts_per_part
        parts = [rows[k : k + per_part] for k in range(0, len(rows), per_part)]
        job = JudgeJob(cfg, iteration, str(run_dir), parts, extra)
        ran = run_parts(job, stage.tmp, cfg.run, label=f"judge iter {iteration}", unit="prefixes",
                        show_progress=show_progress)
        stats = {k: int(v) if float(v).is_integer() else round(v, 6) for k, v in stage.collected_stats("scores").items()}
        for o in j.objectives:
            n = stats.pop(f"{o}_n", 0)
            stats[f"mean_{o}"] = round(stats.pop(f"{o}_sum", 0.0) / n, 4) if n else None
        n = stats.pop("reward_n", 0)
        stats["mean_reward"] = round(stats.pop("reward_sum", 0.0) / n, 4) if n else None
        stats["calls_per_prefix"] = round(stats.get("calls", 0) / max(1, stats.get("prefixes", 1)), 2)
        stats.update(engine=j.engine, scheme=j.scheme, mode=j.mode, executor=ran["executor"], workers=ran["workers"])
        stats.update(judging.judge_signal(stats, j.min_consistency))
        if "judge_warning" in stats and j.fail_on_inconsistent:
            raise SiptError(f"judge iter {iteration}: {stats['judge_warning']}. (judge.fail_on_inconsistent = true; "
                            "every call is cached, so a rerun with it false makes no new calls)")
        return stage.commit(stats, family="scores", errors=stats.get("unscored", 0))


@dataclass
class JudgeJob:
    """The judgments of one part: built here, run by any executor (sipt/executor.py). Every worker
    shares the run's judge cache (SQLite), so no call is made twice."""

    cfg: Config
    iteration: int
    run_dir: str
    parts: list
    extra: dict
    families = ("judgments", "scores")

    def open(self) -> None:
        self.backend = judging.make_backend(Path(self.run_dir), self.cfg.judge)
        self.cache = judging.Cache(Path(self.run_dir) / "cache" / "judge.sqlite")

    def weight(self, k: int) -> int:
        return len(self.parts[k])

    def part(self, k: int):
        j = self.cfg.judge
        seed = derive_seed(self.cfg.run.seed, "judge", self.iteration, k)
        judge = judging.Judge(self.backend, self.cache, j.parse_retries, seed)
        items, meta = _items(self.parts[k], self.extra, j.candidates, seed)
        judging.judge_items(items, judge, judging.Settings(list(j.objectives), j.scheme, j.swap, j.repeats))
        judgments, jstats = _judgments(judge.rows)
        scores, sstats = _scores(items, meta, j.objectives, j.weights)
        return [("judgments", judgments, jstats), ("scores", scores, {**sstats, **jstats})]

    def close(self) -> None:
        if getattr(self, "cache", None) is not None:
            self.cache.close()
            self.backend.close()
            self.cache = None


def _candidates_by_sample(run_dir: Path, iteration: int, wanted: list[str]) -> dict[str, dict]:
    """sample_id -> {"rewrite": (text, ids, error, cut), "rollouts": [(idx, text, ids, error, cut), ...]}
    (cut: the rewrite was cut to the suffix length; the rollout stopped at the token limit)."""
    out: dict[str, dict] = {}
    if "rewrite" in wanted:
        t = artifacts.read_table(artifacts.stage_dir(run_dir, "rewrite", iteration),
                                 columns=["sample_id", "rewrite_text", "rewrite_ids", "error", "truncated"])
        for r in t.to_pylist():
            out.setdefault(r["sample_id"], {}).setdefault(
                "rewrite", (r["rewrite_text"], r["rewrite_ids"], r["error"], r["truncated"]))
    if "rollouts" in wanted:
        t = artifacts.read_table(artifacts.stage_dir(run_dir, "rollout", iteration),
                                 columns=["sample_id", "rollout_idx", "text", "token_ids", "error", "finish_reason"])
        seen = set()
        for r in t.to_pylist():
            if (r["sample_id"], r["rollout_idx"]) in seen:  # a sample repeated in the slice (wrap-around)
                continue
            seen.add((r["sample_id"], r["rollout_idx"]))
            out.setdefault(r["sample_id"], {}).setdefault("rollouts", []).append(
                (r["rollout_idx"], r["text"], r["token_ids"], r["error"], r["finish_reason"] != "stop"))
    return out


def _items(part: list[dict], extra: dict, wanted: list[str], seed: int):
    """The part's judging items, and per item the candidates' (source, rollout_idx, ids, truncated)
    and the candidates that could not be judged (with why).

    The suffix ends naturally where the document ends there; its ids then take the document's EOS
    (the samples' rest_ids is just that EOS), as an uncut rewrite of it does, so every candidate's
    ids end with EOS exactly when it is not truncated."""
    items, meta = [], []
    for row in part:
        sid = row["sample_id"]
        found = extra.get(sid, {})
        cands, info, excluded = [], [], []
        ends = row["split_token"] + len(row["suffix_ids"]) == row["doc_tokens"]
        eos = row["rest_ids"] if ends else []
        if "suffix" in wanted:
            cands.append(judging.Candidate("suffix", row["suffix_text"]))
            info.append(("suffix", -1, row["suffix_ids"] + eos, not ends))
        if "rewrite" in wanted:
            if "rewrite" not in found:
                raise SiptError(f"rewrite/: no rewrite of sample {sid}; rerun `sipt rewrite` for this iteration")
            text, ids, error, cut = found["rewrite"]
            if error:
                excluded.append(("rewrite", "rewrite", -1, text, ids, True, f"rewrite error: {error}"))
            else:
                cands.append(judging.Candidate("rewrite", text))
                info.append(("rewrite", -1, ids + ([] if cut else eos), cut or not ends))
        if "rollouts" in wanted:
            if "rollouts" not in found:
                raise SiptError(f"rollout/: no rollouts of sample {sid}; rerun `sipt rollout` for this iteration")
            for idx, text, ids, error, cut in sorted(found["rollouts"], key=lambda x: x[0]):
                if error:
                    excluded.append((f"rollout:{idx}", "rollout", idx, text, ids, cut, f"rollout error: {error}"))
                else:
                    cands.append(judging.Candidate(f"rollout:{idx}", text))
                    info.append(("rollout", idx, ids, cut))
        items.append(judging.Item(sid, row["prefix_text"], row["suffix_text"], cands, derive_seed(seed, sid)))
        meta.append((info, excluded))
    return items, meta


def _judgments(calls: list[judging.Call]) -> tuple[pa.Table, dict]:
    cols = {name: [] for name in JUDGMENTS.names}
    stats = {"calls": 0, "new_calls": 0, "cached_calls": 0, "invalid": 0}
    for c in calls:
        cols["sample_id"].append(c.sample_id)
        cols["objective"].append(c.objective)
        cols["candidate_1"].append(c.labels[0])
        cols["candidate_2"].append(c.labels[1] if len(c.labels) > 1 else "")
        cols["repeat"].append(c.repeat)
        cols["attempt"].append(c.attempt)
        cols["seed"].append(c.seed)
        cols["prompt_hash"].append(c.key)
        cols["response"].append(c.response)
        cols["verdict"].append(c.verdict)
        cols["valid"].append(c.verdict is not None)
        cols["error"].append(c.error)
        stats["calls"] += 1
        stats["new_calls"] += c.fresh
        stats["cached_calls"] += not c.fresh
        stats["invalid"] += c.verdict is None
        stats[f"calls_{c.objective}"] = stats.get(f"calls_{c.objective}", 0) + 1
    stats.update(judging.position_stats(calls))
    return pa.table(cols, schema=JUDGMENTS), stats


def _scores(items: list[judging.Item], meta, objectives: list[str], weights: dict) -> tuple[pa.Table, dict]:
    schema = scores_schema()
    cols = {name: [] for name in schema.names}
    stats = {"prefixes": len(items), "candidates": 0, "excluded": 0, "unscored": 0, "reward_n": 0, "reward_sum": 0.0}
    pair_obj = next((o for o, d in OBJECTIVES.items() if d.pairwise and o in objectives), None)

    def add(sid, label, source, idx, text, ids, truncated, scores, comparisons, reward, error):
        cols["sample_id"].append(sid)
        cols["candidate"].append(label)
        cols["source"].append(source)
        cols["rollout_idx"].append(idx)
        cols["text"].append(text)
        cols["token_ids"].append(ids)
        cols["truncated"].append(truncated)
        for name in OBJECTIVES:
            cols[name].append(scores.get(name))
        cols["comparisons"].append(comparisons)
        cols["reward"].append(reward)
        cols["error"].append(error)

    for item, (info, excluded) in zip(items, meta):
        for k, (cand, (source, idx, ids, truncated)) in enumerate(zip(item.candidates, info)):
            scores = {o: item.scores[o][k] for o in objectives}
            r = judging.reward(scores, weights)
            missing = [o for o, v in scores.items() if v is None]
            add(item.sample_id, cand.label, source, idx, cand.text, ids, truncated, scores,
                item.comparisons[pair_obj][k] if pair_obj else 0, r,
                f"no valid {', '.join(missing)} verdict" if missing else "")
            stats["candidates"] += 1
            stats["unscored"] += r is None
            if r is not None:
                stats["reward_n"] += 1
                stats["reward_sum"] += r
            for o, v in scores.items():
                if v is not None:
                    stats[f"{o}_n"] = stats.get(f"{o}_n", 0) + 1
                    stats[f"{o}_sum"] = stats.get(f"{o}_sum", 0.0) + v
        for label, source, idx, text, ids, truncated, error in excluded:
            add(item.sample_id, label, source, idx, text or "", ids or [], truncated, {}, 0, None, error)
            stats["excluded"] += 1
    return pa.table(cols, schema=schema), stats
