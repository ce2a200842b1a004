"""Eval's second half: judge the policy's generations, write the tables and summarize (stages/eval.py).

Each generation is judged
- pairwise against each baseline's generation of the same prefix (the pairwise objectives, e.g.
  quality, coherence), in both orders and with `eval.judge_seeds` seeds each: the win rate
  `<objective>_win_rate` counts a tie as half a win;
- pointwise (e.g. safety, factuality with the original suffix as reference), with the metrics each
  objective declares (sipt/objectives.py: safe_rate, false_fact_rate, ...).
The columns and summary keys follow the registered objectives; the toy world's ground-truth keys come
from sipt.oracle_metrics. Every rate and win rate gets a 95% percentile-bootstrap interval
(`sipt.stats`, seeded): `summary["ci"][key] = [lo, hi]` in the key's units, and per baseline
`versus[b]` holds the win rates, their intervals, `n` (comparisons with a verdict) and
`judge_invalid` (unreadable verdicts).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sipt import judging, oracle_metrics, stats
from sipt.objectives import OBJECTIVES, pairwise, pointwise
from sipt.oracle_metrics import GT, at_risk_unsafe, ci, pct
from sipt.samples import derive_seed


def generations_schema() -> pa.Schema:
    """One row per prefix: the policy's generation, a column per pointwise objective, the gt_* counts."""
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("group", pa.string()),  # the eval.group_by meta value ("" without one)
            ("prefix_text", pa.string()),
            ("suffix_text", pa.string()),
            ("text", pa.string()),  # the policy's greedy continuation
            ("token_ids", pa.list_(pa.int32())),
            ("finish_reason", pa.string()),
            # the mean score over the seeds (safety: the share that judged it safe); null if not judged
            *[(o, pa.float32()) for o in pointwise()],
            # ground truth (OracleJudge.counts, the suffix as reference); null unless the judge is the oracle
            *[(f"gt_{k}", pa.int32()) for k in GT],
            ("error", pa.string()),
        ]
    )


def versus_schema() -> pa.Schema:
    """One row per prefix and baseline: a column per pairwise objective."""
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("baseline", pa.string()),  # the eval.baselines entry
            ("baseline_text", pa.string()),
            # share won by the policy (ties count 0.5); null if not judged
            *[(o, pa.float32()) for o in pairwise()],
        ]
    )


def judge_generations(run_dir: Path, cfg, rows, gens, base_texts, pairwise_objectives, pointwise_objectives, seed):
    """Per-sample pointwise scores {objective: [..]}, pairwise {baseline: {objective: [..]}}, stats,
    and {baseline: judge calls with an unreadable verdict in its comparisons}."""
    e = cfg.eval
    backend = judging.make_backend(run_dir, cfg.judge, temperature=e.judge_temperature)
    cache = judging.Cache(run_dir / "cache" / "judge.sqlite")
    points: dict[str, list] = {o: [None] * len(rows) for o in pointwise_objectives}
    versus: dict[str, dict[str, list]] = {b: {o: [None] * len(rows) for o in pairwise_objectives} for b in base_texts}
    invalid_by: dict[str, int] = {}
    try:
        judge = judging.Judge(backend, cache, cfg.judge.parse_retries, seed)
        if pointwise_objectives:
            items = [judging.Item(r["sample_id"], r["prefix_text"], r["suffix_text"],
                                  [judging.Candidate("policy", g.text)], derive_seed(seed, r["sample_id"]))
                     for r, g in zip(rows, gens) if not g.error]
            judging.judge_items(items, judge, judging.Settings(pointwise_objectives, repeats=e.judge_seeds))
            index = {r["sample_id"]: k for k, r in enumerate(rows)}
            for item in items:
                for o in pointwise_objectives:
                    points[o][index[item.sample_id]] = item.scores[o][0]
        for b, texts in base_texts.items():
            items, where = [], []
            for k, (r, g, bt) in enumerate(zip(rows, gens, texts)):
                if g.error or bt["error"]:
                    continue
                if g.text == bt["text"]:  # the same text: a tie, no judge needed
                    for o in pairwise_objectives:
                        versus[b][o][k] = 0.5
                    continue
                items.append(judging.Item(r["sample_id"], r["prefix_text"], r["suffix_text"],
                                          [judging.Candidate("policy", g.text), judging.Candidate("baseline", bt["text"])],
                                          derive_seed(seed, r["sample_id"], b)))
                where.append(k)
            first = len(judge.rows)
            judging.judge_items(items, judge, judging.Settings(pairwise_objectives, "all-pairs", swap=True,
                                                               repeats=e.judge_seeds))
            invalid_by[b] = sum(c.verdict is None for c in judge.rows[first:])
            for k, item in zip(where, items):
                for o in pairwise_objectives:
                    versus[b][o][k] = item.scores[o][0]
        calls = len(judge.rows)
        fresh = sum(c.fresh for c in judge.rows)
        invalid = sum(c.verdict is None for c in judge.rows)
        signal = judging.judge_signal(judging.position_stats(judge.rows), cfg.judge.min_consistency)
    finally:
        cache.close()
        backend.close()
    judge_stats = {"judge_calls": calls, "judge_new_calls": fresh, "judge_invalid": invalid,
                   "judge_option1_rate": signal["option1_rate"],
                   "judge_position_consistency": signal["position_consistency"]}
    if "judge_warning" in signal:
        judge_stats["judge_warning"] = signal["judge_warning"]
    return points, versus, judge_stats, invalid_by


def tables(rows, gens, base_texts, points, versus, gt) -> tuple[pa.Table, pa.Table]:
    """The generations table (one row per prefix) and the versus table (one per prefix and baseline)."""
    n = len(rows)
    g = {
        "sample_id": [r["sample_id"] for r in rows],
        "group": [r["group"] for r in rows],
        "prefix_text": [r["prefix_text"] for r in rows],
        "suffix_text": [r["suffix_text"] for r in rows],
        "text": [x.text for x in gens],
        "token_ids": [x.token_ids for x in gens],
        "finish_reason": [x.finish_reason for x in gens],
        **{o: points.get(o, [None] * n) for o in pointwise()},
        **gt,
        "error": [x.error for x in gens],
    }
    schema = versus_schema()
    v = {name: [] for name in schema.names}
    for b, texts in base_texts.items():
        for k, r in enumerate(rows):
            v["sample_id"].append(r["sample_id"])
            v["baseline"].append(b)
            v["baseline_text"].append(texts[k]["text"])
            for o in pairwise():
                v[o].append(versus[b].get(o, [None] * n)[k])
    return pa.table(g, schema=generations_schema()), pa.table(v, schema=schema)


def _series(gen: list[dict], objective: str, metric) -> list:
    """A pointwise metric's per-generation series: its indicator of each score (None: not judged)."""
    f = metric.indicator
    return [None if r[objective] is None else (f(r[objective]) if f else r[objective]) for r in gen]


def metrics(gen: list[dict], ver: dict[str, list[dict]], first: str | None) -> dict:
    """The summary's metrics over generation rows and their versus rows by baseline (`first`: the
    baseline of the headline win rates)."""
    out = {"n": len(gen)}
    for o in pairwise():
        out[f"{o}_win_rate"] = pct([r[o] for r in ver.get(first, [])]) if first else None
    for o in pointwise():
        for m in OBJECTIVES[o].metrics:
            if m.complement:
                base = out[m.complement]
                out[m.key] = None if base is None else round(100.0 - base, 2)
            else:
                out[m.key] = pct(_series(gen, o, m))
    out.update(oracle_metrics.claim_metrics(gen))  # ground truth (the toy world): None without the oracle
    return out


def intervals(gen: list[dict], first_versus: list[dict], risk_safe: list, risk_recovered: list) -> dict:
    """95% bootstrap intervals (`sipt.stats`, seed 0) of the headline rates, in their units: % for
    rates and win rates, counts for the per-generation keys."""
    scale = {"scale": 100.0}
    out = {f"{o}_win_rate": ci(stats.bootstrap_ci([r[o] for r in first_versus], **scale)) for o in pairwise()}
    for o in pointwise():
        for m in OBJECTIVES[o].metrics:
            if m.ci:
                out[m.key] = ci(stats.bootstrap_ci(_series(gen, o, m), **scale))
    out.update(oracle_metrics.claim_intervals(gen))
    out["at_risk_unsafe_rate"] = ci(stats.bootstrap_ci(at_risk_unsafe(risk_safe), **scale))
    out["at_risk_recovered_rate"] = ci(stats.bootstrap_ci(_floats(risk_recovered), **scale))
    return out


def _floats(flags: list) -> list:
    return [None if f is None else float(f) for f in flags]


def _versus_entry(rs: list[dict], invalid: int) -> dict:
    scale = {"scale": 100.0}
    out = {f"{o}_win_rate": pct([r[o] for r in rs]) for o in pairwise()}
    out.update({f"{o}_win_rate_ci": ci(stats.bootstrap_ci([r[o] for r in rs], **scale)) for o in pairwise()})
    out["n"] = sum(any(r[o] is not None for o in pairwise()) for r in rs)
    out["judge_invalid"] = int(invalid)
    return out


def summarize(gen_table: pa.Table, ver_table: pa.Table, baselines: list[str], judge_stats: dict,
              benchmarks: dict, risk_table: pa.Table | None = None, invalid_by: dict | None = None) -> dict:
    """summary.json: the metrics, the at-risk rate, per-baseline win rates, intervals, by group."""
    gen = gen_table.to_pylist()
    ver_rows = ver_table.to_pylist()
    by_base = {b: [r for r in ver_rows if r["baseline"] == b] for b in baselines}
    first = baselines[0] if baselines else None
    summary = metrics(gen, by_base, first)
    risk_safe = risk_table["safe"].to_pylist() if risk_table is not None else []
    risk_rec = (risk_table["recovered"].to_pylist()
                if risk_table is not None and "recovered" in risk_table.column_names else [])
    summary["at_risk_n"] = len(risk_safe)
    summary["at_risk_unsafe_rate"] = pct(at_risk_unsafe(risk_safe))
    summary["at_risk_recovered_rate"] = pct(_floats(risk_rec))
    summary["baseline"] = first
    summary["versus"] = {b: _versus_entry(rs, (invalid_by or {}).get(b, 0)) for b, rs in by_base.items()}
    summary["ci"] = intervals(gen, by_base.get(first, []), risk_safe, risk_rec)
    groups = sorted({r["group"] for r in gen if r["group"]})
    if groups:
        summary["by_group"] = {}
        for grp in groups:
            ids = {r["sample_id"] for r in gen if r["group"] == grp}
            summary["by_group"][grp] = metrics([r for r in gen if r["group"] == grp],
                                               {b: [r for r in rs if r["sample_id"] in ids] for b, rs in by_base.items()},
                                               first)
    summary["mean_tokens"] = round(sum(len(r["token_ids"]) for r in gen) / max(1, len(gen)), 2)
    summary["benchmarks"] = benchmarks
    accs = [v["acc"] for v in benchmarks.values() if v.get("acc") is not None]
    summary["benchmark_avg"] = round(100.0 * sum(accs) / len(accs), 2) if accs else None
    summary.update(judge_stats)
    return summary
