"""report: `report.md`, a printed table and PNG charts of a run and the runs it is compared with.

Read only from the runs' manifests and Parquet:
- each iteration's eval summary: the main table, one row per evaluated policy, every value with its
  95% bootstrap interval where eval computed one, "–" where a value was not measured (never 0);
- the eval generations of two policies joined by prompt: the head-to-head block (the main run
  against each compared run at their last common iteration, and against its own initial policy),
  with differences and ratios and paired bootstrap intervals (sipt.stats);
- the pair stage's rollout-chosen rate (PAPER Fig. 8), the judge's reward by candidate source, and
  the training log per optimizer step (DPO loss, reward margin and pair accuracy in panels apart
  from NTP's cross-entropy, iteration boundaries marked).
A judge or eval stage that flagged its judge (`judge_warning`: it reads the position more than the
texts) is shown in red at the top. Written to <run>/report/. `replicate_table` summarises several
runs per label (one per world seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple

from sipt import artifacts, objectives, replicate, rewrite_reward
from sipt.charts import (  # noqa: F401 (PANELS, TRAIN_PANELS and the charts: re-exported)
    PANELS, TRAIN_PANELS, reward_chart, rollout_chosen_chart, training_chart, write_charts)
from sipt.charts import metrics_chart as draw_metrics_chart
from sipt.charts import wilson_interval as _wilson
from sipt.errors import SiptError
from sipt.replicate import names_run as _names_run

MISSING = "–"


class Column(NamedTuple):
    """A metric of the eval summary: its key (also its key in summary["ci"]), its title, how it is
    printed (pct: one decimal, num: two, int) and, where it is not summary[key], how to read it."""

    key: str
    title: str
    kind: str = "pct"
    get: Callable[[dict], object] | None = None


def _first_versus(s: dict) -> dict:
    """The summary's entry against its first baseline (the one its win rates are against)."""
    return (s.get("versus") or {}).get(s.get("baseline")) or {}


def _judge_invalid(s: dict):
    v = _first_versus(s).get("judge_invalid")
    return v if v is not None else s.get("judge_invalid")


def columns() -> list[Column]:
    """The main table, in order: the win rate of each pairwise objective, then the judge's invalid
    calls and the toy world's ground truth, then the titled metrics of the pointwise objectives (their
    declarations in sipt/objectives.py), then the benchmarks. Adding a metric here is one entry."""
    return [
        *[Column(f"{o}_win_rate", d.title or f"{o} win %") for o, d in objectives.OBJECTIVES.items() if d.pairwise],
        Column("judge_invalid", "Judge invalid", "int", _judge_invalid),
        Column("at_risk_unsafe_rate", "Unsafe % (at-risk)"),
        Column("at_risk_recovered_rate", "Safe & well-formed % (at-risk)"),
        Column("claim_precision", "Claim precision %"),
        Column("true_claims_per_generation", "True claims / gen", "num"),
        Column("claims_per_generation", "Claims / gen", "num"),
        Column("clean_share", "Clean share %"),
        Column("repeat_share", "Repeat share %"),
        Column("reference_recall", "Reference recall %"),
        *[Column(m.key, m.title) for d in objectives.OBJECTIVES.values() if not d.pairwise
          for m in d.metrics if m.title],
        Column("benchmark_avg", "MC / benchmark avg %"),
    ]


class _Columns(Sequence):
    """`columns()` as a constant: read at each use, so an objective registered after import shows."""

    def __getitem__(self, k):
        return columns()[k]

    def __iter__(self):
        return iter(columns())

    def __len__(self) -> int:
        return len(columns())


COLUMNS = _Columns()


LEGEND = ("Claim precision: true / all fact claims of the generations; clean share: generations with a true "
          "claim and no false one; repeat share: generations that repeat a sentence; reference recall: the "
          "original suffixes' true facts the generations state; false-fact rate: generations the judge rates a "
          "definite hallucination. The toy world's oracle counts the claims (ground truth).")


def _stats():
    """sipt.stats (bootstrap intervals), or None where it is not there: intervals then show "–"."""
    try:
        from sipt import stats
    except ImportError:
        return None
    return stats


def _num(v, kind: str = "pct") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if kind == "int":
        return str(int(round(v)))
    return f"{v:.1f}" if kind == "pct" else f"{v:.2f}"


def fmt(v, ci=None, kind: str = "pct") -> str:
    """`57.1 [50.2, 63.9]`: a value and its 95% interval; "–" for a value that was not measured."""
    s = _num(v, kind)
    if s != MISSING and ci is not None and len(ci) == 2 and None not in ci:
        s += f" [{_num(ci[0], kind)}, {_num(ci[1], kind)}]"
    return s


def _win_rates() -> set[str]:
    return {f"{o}_win_rate" for o in objectives.pairwise()}


def value(summary: dict, col: Column) -> tuple[object, list | None]:
    """A column's value in a summary and its interval (None, None where it is missing)."""
    v = col.get(summary) if col.get else summary.get(col.key)
    ci = (summary.get("ci") or {}).get(col.key)
    if ci is None and col.key in _win_rates():  # a win rate: the interval against the first baseline
        ci = _first_versus(summary).get(f"{col.key}_ci")
    return v, ci


# -- reading a run -------------------------------------------------------------------------------


def collect(run_dir: Path) -> dict:
    """Everything the report shows about one run, from its artifacts."""
    run_dir = Path(run_dir)
    if not (run_dir / "samples").exists() and not artifacts.iterations(run_dir):
        raise SiptError(f"{run_dir}: no run here (no samples/ and no iter-NNN/); run `sipt loop` first")
    data = {"name": run_dir.name, "path": run_dir, "evals": {}, "pairs": {}, "rewards": {}, "reward_ci": {},
            "train": [], "objectives": {}, "judge_warnings": []}
    for i in artifacts.iterations(run_dir):
        ev = artifacts.read_manifest(artifacts.stage_dir(run_dir, "eval", i))
        if ev:
            data["evals"][i] = ev["stats"]
        pair = artifacts.read_manifest(artifacts.stage_dir(run_dir, "pair", i))
        if pair:
            data["pairs"][i] = pair["stats"]
        judge_dir = artifacts.stage_dir(run_dir, "judge", i)
        for stage, m in (("judge", artifacts.read_manifest(judge_dir)), ("eval", ev)):
            if m and m["stats"].get("judge_warning"):
                data["judge_warnings"].append(f"{stage} iter {i}: {m['stats']['judge_warning']}")
        if artifacts.read_manifest(judge_dir):
            t = artifacts.read_table(judge_dir, columns=["source", "reward"], prefix="scores-").to_pylist()
            by: dict[str, list[float]] = {}
            for r in t:
                if r["reward"] is not None:
                    by.setdefault(r["source"], []).append(r["reward"])
            data["rewards"][i] = {s: sum(v) / len(v) for s, v in by.items()}
            data["reward_ci"][i] = {s: _normal_ci(v) for s, v in by.items()}
        train_dir = artifacts.stage_dir(run_dir, "train", i)
        train = artifacts.read_manifest(train_dir)
        if train:
            objective = train["stats"].get("objective")
            data["objectives"][i] = objective
            log = train_dir / "log.jsonl"
            if log.exists():
                for line in log.read_text().splitlines():
                    if line.strip():
                        data["train"].append({**json.loads(line), "iteration": i, "objective": objective})
    data["loss"] = [(r["step"], r["loss"], r["iteration"]) for r in data["train"]]
    data["objective"] = data["objectives"][max(data["objectives"])] if data["objectives"] else None
    return data


def _normal_ci(values: list[float]) -> tuple[float, float] | None:
    """Mean ± 1.96 standard errors (the reward chart: many candidates, a rough band is enough)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean - 1.96 * se, mean + 1.96 * se


def per_prompt_rows(run_dir: Path, iteration: int, family: str = "generations") -> list[dict] | None:
    """The eval stage's per-prompt rows of one iteration (`generations-*`: the held-out prompts;
    `at_risk-*`: the at-risk safety set), or None where there are none."""
    folder = artifacts.stage_dir(run_dir, "eval", iteration)
    if not artifacts.read_manifest(folder) or not artifacts.list_parts(folder, f"{family}-"):
        return None
    table = artifacts.read_table(folder, prefix=f"{family}-")
    return table.drop_columns([c for c in ("token_ids",) if c in table.column_names]).to_pylist()


# -- the tables ----------------------------------------------------------------------------------


def table_rows(runs: list[dict]) -> list[list[str]]:
    """One row per evaluated policy: the first run's every iteration, then each compared run's last."""
    rows = []
    for k, d in enumerate(runs):
        its = sorted(d["evals"])
        for i in (its if k == 0 else its[-1:]):
            s = d["evals"][i]
            label = d["name"] + (" (initial)" if i == 0 else "")
            rows.append([label, str(i), *[fmt(*value(s, c), c.kind) for c in COLUMNS]])
    return rows


class Paired(NamedTuple):
    """A per-prompt metric of two runs on the same prompts: a prompt's (numerator, denominator), or
    None where it does not count; a run's value is scale x sum(numerators) / sum(denominators).
    `family` is the eval table it is read from (generations: the held-out prompts, joined on
    sample_id; at_risk: the at-risk safety set, joined on document, sentence and cut)."""

    title: str
    kind: str
    scale: float
    family: str
    per_prompt: Callable[[dict], tuple[float, float] | None]


PROMPT_KEY = {"generations": lambda r: r["sample_id"], "at_risk": lambda r: (r["doc_id"], r["sentence"], r["cut"])}


def _counts(num: str, den: str | None):
    def get(r: dict):
        if r.get(num) is None or (den and r.get(den) is None):
            return None
        return float(r[num]), (float(r[den]) if den else 1.0)
    return get


PAIRED = [
    Paired("Claim precision %", "pct", 100.0, "generations", _counts("gt_true", "gt_claims")),
    Paired("True claims / gen", "num", 1.0, "generations", _counts("gt_true", None)),
    Paired("Unsafe % (at-risk)", "pct", 100.0, "at_risk",
           lambda r: None if r.get("safe") is None else (float(not r["safe"]), 1.0)),
    Paired("Safe & well-formed % (at-risk)", "pct", 100.0, "at_risk",
           lambda r: None if r.get("recovered") is None else (float(r["recovered"]), 1.0)),
    Paired("False-fact % (judge)", "pct", 100.0, "generations",
           lambda r: None if r.get("factuality") is None else (float(r["factuality"] == 0.0), 1.0)),
]


def paired(rows_a: list[dict], rows_b: list[dict], metric: Paired) -> dict:
    """Run A against run B on the prompts both measured: each run's value, the difference A − B and
    the ratio A / B, with paired bootstrap 95% intervals (sipt.stats.paired_ratio_ci: the same
    prompts resampled for both runs). The ratio is None where B's value is 0."""
    key = PROMPT_KEY[metric.family]
    by_key = {key(r): r for r in rows_b}
    num_a, den_a, num_b, den_b = [], [], [], []
    for r in rows_a:
        other = by_key.get(key(r))
        xa = metric.per_prompt(r)
        xb = metric.per_prompt(other) if other is not None else None
        if xa is None or xb is None:
            continue
        num_a.append(xa[0])
        den_a.append(xa[1])
        num_b.append(xb[0])
        den_b.append(xb[1])
    va = metric.scale * sum(num_a) / sum(den_a) if sum(den_a) else None
    vb = metric.scale * sum(num_b) / sum(den_b) if sum(den_b) else None
    out = {"a": va, "b": vb, "n": len(num_a), "diff": None, "diff_ci": None, "ratio": None, "ratio_ci": None}
    if va is None or vb is None:
        return out
    out["diff"] = va - vb
    out["ratio"] = va / vb if vb else None
    st = _stats()
    if st is not None:
        out["diff_ci"] = st.paired_ratio_ci(num_a, den_a, num_b, den_b, statistic="difference", scale=metric.scale)
        if out["ratio"] is not None:
            out["ratio_ci"] = st.paired_ratio_ci(num_a, den_a, num_b, den_b, statistic="ratio")
    return out


def _versus(summary: dict, b: dict | None) -> tuple[str | None, dict]:
    """The summary's versus entry against run `b` (None: against the initial policy)."""
    versus = summary.get("versus") or {}
    if b is None:
        name = "initial" if "initial" in versus else None
    else:
        name = next((e for e in versus if _names_run(e, b["path"])), None) \
            or next((e for e in versus if e != "initial" and Path(e).name == b["name"]), None)
    if name is None:
        return None, {}
    entry = dict(versus[name])
    if name == summary.get("baseline"):  # the first baseline: eval put its intervals in summary["ci"]
        for key in ("quality_win_rate", "coherence_win_rate"):
            entry.setdefault(f"{key}_ci", (summary.get("ci") or {}).get(key))
        entry.setdefault("judge_invalid", summary.get("judge_invalid"))
    return name, entry


def head_to_head(a: dict, i: int, b: dict | None, j: int) -> list[str]:
    """Markdown: run `a` at iteration i against run `b` at iteration j (b None: a's own iteration j,
    its initial policy). Win rates come from a's eval, which judged the two generations of each
    prompt against each other; the other metrics from both runs' per-prompt rows."""
    b_name = f"{a['name']} iter {j}" + (" (initial)" if j == 0 else "") if b is None else f"{b['name']} iter {j}"
    b_path = a["path"] if b is None else b["path"]
    sa = a["evals"][i]
    entry_name, entry = _versus(sa, b)
    rows = {f: (per_prompt_rows(a["path"], i, f), per_prompt_rows(b_path, j, f)) for f in PROMPT_KEY}
    ga, gb = rows["generations"]
    joined = len({r["sample_id"] for r in ga} & {r["sample_id"] for r in gb}) if ga and gb else None
    n = entry.get("n") or joined or sa.get("n")
    a_name = f"{a['name']} iter {i}"
    lines = [f"### {a_name} vs {b_name}", "",
             f"1 seed, {_num(n, 'int')} prompts; in brackets: 95% bootstrap intervals over prompts, resampled "
             "jointly for the two runs.", ""]
    if entry:
        lines += [f"{a['name']}'s generations judged against `{entry_name}`'s on the same prompts "
                  "(both orders, ties count half):", "",
                  "| | win % [95% CI] | judge invalid | prompts |", "|---|---|---|---|"]
        for key, title in ((f"{o}_win_rate", o) for o in objectives.pairwise()):
            lines.append(f"| {title} | {fmt(entry.get(key), entry.get(f'{key}_ci'))} | "
                         f"{_num(entry.get('judge_invalid'), 'int')} | {_num(entry.get('n'), 'int')} |")
    else:
        target = "initial" if b is None else str(b["path"])
        lines.append(f"Win rates: {MISSING} ({a['name']} iter {i} was not judged against {b_name}; add "
                     f"{target!r} to eval.baselines and rerun `sipt eval --force`).")
    lines += ["", f"| metric | {a_name} | {b_name} | difference [95% CI] | ratio [95% CI] | prompts |",
              "|---|---|---|---|---|---|"]
    for m in PAIRED:
        ra, rb = rows[m.family]
        if not ra or not rb:
            lines.append(f"| {m.title} | {MISSING} | {MISSING} | {MISSING} | {MISSING} | 0 |")
            continue
        p = paired(ra, rb, m)
        lines.append(f"| {m.title} | {_num(p['a'], m.kind)} | {_num(p['b'], m.kind)} | "
                     f"{fmt(p['diff'], p['diff_ci'], m.kind)} | {fmt(p['ratio'], p['ratio_ci'], 'num')} | {p['n']} |")
    return lines + [""]


def comparison(runs: list[dict]) -> list[str]:
    """The head-to-head block: the main run against each compared run at their last common iteration,
    and against its own initial policy."""
    a = runs[0]
    if not a["evals"]:
        return []
    lines = []
    for b in runs[1:]:
        common = sorted(set(a["evals"]) & set(b["evals"]))
        if not common:
            lines += [f"### {a['name']} vs {b['name']}", "", f"{MISSING}: no iteration evaluated in both runs.", ""]
            continue
        lines += head_to_head(a, common[-1], b, common[-1])
    last = max(a["evals"])
    if last != 0 and 0 in a["evals"]:
        lines += head_to_head(a, last, None, 0)
    return lines


def _pairs_lines(pairs: dict) -> list[str]:
    lines = ["| iter | pairs | rollout chosen % [95% CI] | mean margin |", "|---|---|---|---|"]
    for i, p in sorted(pairs.items()):
        rate, n = p.get("rollout_chosen_rate"), p.get("pairs")
        ci = [100 * x for x in _wilson(rate, n)] if rate is not None and n else None
        lines.append(f"| {i} | {_num(n, 'int')} | {fmt(None if rate is None else 100 * rate, ci)} | "
                     f"{_num(p.get('mean_margin'), 'num')} |")
    return lines


# -- charts (sipt.charts draws them) -------------------------------------------------------------


def _point(summary: dict, key: str) -> tuple[object, list | None]:
    """A metrics chart's point: the summary's value and interval, read as the main table reads them."""
    return value(summary, Column(key, key))


def metrics_chart(runs: list[dict], out: Path) -> dict:
    """metrics.png (sipt.charts.metrics_chart), its points read by `value`."""
    return draw_metrics_chart(runs, out, _point)


def _charts(runs: list[dict], out: Path) -> list[tuple[str, str]]:
    return write_charts(runs, out, _point)


# -- the report ----------------------------------------------------------------------------------


def run(run_dir: Path, compare: list[Path] | None = None) -> dict:
    """Write <run>/report/report.md and its charts; return what was written, the table and the
    head-to-head block."""
    run_dir = Path(run_dir)
    runs = [collect(run_dir), *[collect(Path(c)) for c in compare or []]]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "iter", *[c.title for c in COLUMNS]]
    rows = table_rows(runs)
    main = runs[0]
    base = next((e.get("baseline") for e in main["evals"].values() if e.get("baseline")), None)
    md = [f"# sipt report: {main['name']}", ""]
    for d in runs:  # a judge that reads the position more than the texts: its win rates and rewards mean little
        md += [f'<span style="color:red">**⚠ {d["name"]}, {w}**</span>' for w in d["judge_warnings"]]
    if any(d["judge_warnings"] for d in runs):
        md.append("")
    if base:
        md += [f"Win rates are against `{base}` (both orders, ties count half).", ""]
    md += [f"`57.1 [50.2, 63.9]`: a value and its 95% bootstrap interval over prompts (1 seed); "
           f"`{MISSING}`: not measured. {LEGEND}", ""]
    cmp_lines = comparison(runs)
    if cmp_lines:
        md += ["## Head to head", "", *cmp_lines]
    md += ["## Metrics per evaluated policy", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    at_risk = sorted({s["at_risk_n"] for d in runs for s in d["evals"].values() if s.get("at_risk_n")})
    if at_risk:
        md += ["", "Unsafe % (at-risk): the share of unsafe continuations of held-out prefixes cut 1-3 words into "
               f"an unsafe sentence ({', '.join(map(str, at_risk))} prefixes), judged by the oracle."]
    for d in runs:
        if d["pairs"]:
            md += ["", f"## Pairs per iteration ({d['name']})", "", *_pairs_lines(d["pairs"])]
    groups = {g for e in main["evals"].values() for g in e.get("by_group", {})}
    if groups:
        last = main["evals"][max(main["evals"])]
        cols = [c for c in COLUMNS if any(c.key in m for m in last.get("by_group", {}).values())]
        md += ["", f"## By prefix group (iter {max(main['evals'])})", "",
               "| group | n | " + " | ".join(c.title for c in cols) + " |", "|" + "---|" * (2 + len(cols))]
        for g in sorted(groups):
            m = last.get("by_group", {}).get(g, {})
            cells = [fmt(*value(m, c), c.kind) for c in cols]
            md.append(f"| {g} | {_num(m.get('n'), 'int')} | " + " | ".join(cells) + " |")
    charts = _charts(runs, out)
    for title, png in charts:
        md += ["", f"## {title}", "", f"![{title}]({png})"]
    md += rewrite_reward.report_section(run_dir, out, fmt)
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "charts": [png for _, png in charts], "header": header,
            "rows": rows, "comparison": cmp_lines}


# -- several world seeds (sipt.replicate) --------------------------------------------------------


def replicate_table(run_groups: list[tuple[str, list[Path]]]) -> str:
    """Markdown: for each label (e.g. sipt, ntp), its runs' last-iteration metrics over the world seeds
    as mean (min–max), head to head and per-seed ratios (sipt.replicate.replicate_table), in the
    main table's columns."""
    return replicate.replicate_table(run_groups, COLUMNS, value, _num)
