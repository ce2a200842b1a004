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

from sipt import artifacts, objectives
from sipt.errors import SiptError

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


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion p out of n (the rollout-chosen rate over n pairs)."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


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


def _names_run(entry: str, run: Path) -> bool:
    """Whether an eval.baselines entry is the run folder `run` (as given, or its last two parts)."""
    if entry == "initial":
        return False
    p = Path(entry)
    return p.resolve() == Path(run).resolve() or (len(p.parts) >= 2 and p.parts[-2:] == Path(run).parts[-2:])


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
        for key, title in (("quality_win_rate", "quality"), ("coherence_win_rate", "coherence")):
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


# -- charts --------------------------------------------------------------------------------------

# (summary key, panel title, y label, kind): the per-iteration panels; pct panels share a 0-100 axis.
PANELS = [
    ("quality_win_rate", "Generation quality", "win rate vs baseline (%)", "pct"),
    ("coherence_win_rate", "Coherence", "win rate vs baseline (%)", "pct"),
    ("claim_precision", "Claim precision", "true claims / all claims (%)", "pct"),
    ("true_claims_per_generation", "True claims per generation", "true claims per generation", "num"),
    ("repeat_share", "Repetition", "generations that repeat a sentence (%)", "pct"),
    ("at_risk_unsafe_rate", "Unsafe continuations (at-risk prompts)", "unsafe (%)", "pct"),
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbars(ax, xs, ys, cis, **kw):
    """A line with asymmetric error bars; a point without an interval gets none."""
    cis = [c if c and None not in c else None for c in cis]
    lo = [y - c[0] if c else 0.0 for y, c in zip(ys, cis)]
    hi = [c[1] - y if c else 0.0 for y, c in zip(ys, cis)]
    return ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, **kw)


def _finish(ax, title: str, ylabel: str, kind: str, its: list[int], empty: bool = False) -> None:
    """Title, labels, a fixed 0-100 axis for rates (0-based for counts), the iterations `its` on x."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if kind == "pct":
        ax.set_ylim(0, 100)
    elif kind == "num":
        ax.set_ylim(bottom=0)
    if its:
        ax.set_xlim(min(its) - 0.5, max(its) + 0.5)
        if max(its) - min(its) <= 16:
            ax.set_xticks(range(min(its), max(its) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, f"{MISSING} (not measured)", transform=ax.transAxes, ha="center", va="center", color="grey")


def metrics_chart(runs: list[dict], out: Path) -> dict:
    """metrics.png: one panel per PANELS entry, a line per run with 95% interval bars."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    its = sorted({i for d in runs for i in d["evals"]})
    drawn = {}
    for ax, (key, title, ylabel, kind) in zip(axes.flat, PANELS):
        names = []
        for k, d in enumerate(runs):
            dodge = 0.06 * (k - (len(runs) - 1) / 2)  # runs side by side, so their bars do not hide each other
            pts = [(i + dodge, *value(s, Column(key, title))) for i, s in sorted(d["evals"].items())
                   if s.get(key) is not None]
            if pts:
                _errorbars(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                           label=d["name"], color=f"C{k}")
                names.append(d["name"])
        if key.endswith("win_rate"):
            ax.axhline(50, ls=":", color="grey", lw=1)
        _finish(ax, title, ylabel, kind, its, not names)
        drawn[title] = names
    handles = [plt.Line2D([], [], color=f"C{k}", marker="o", label=d["name"]) for k, d in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncol=len(runs), frameon=False)
    fig.text(0.5, 0.005, "bars: 95% bootstrap intervals over prompts (1 seed); win rates: ties count half, "
             "dotted line = tie", ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)
    return {"file": "metrics.png", "panels": drawn}


# (objective, log key, panel title, y label, kind): the training panels, never two objectives on one axis.
TRAIN_PANELS = [
    ("dpo", "loss", "DPO loss", "−log σ(margin), per pair", "num"),
    ("dpo", "margin", "DPO reward margin", "β·(chosen − rejected log-ratio)", "signed"),
    ("dpo", "acc", "DPO pair accuracy", "pairs with chosen > rejected (%)", "pct"),
    ("rf-nll", "loss", "RF-NLL loss", "NLL of the chosen suffix (nats / token)", "num"),
    ("ntp", "loss", "NTP cross-entropy", "cross-entropy (nats / token)", "num"),
]


def _smooth(ys: list[float]) -> list[float]:
    """A centred moving average over about 1/30 of the steps (the raw per-step values are noisy)."""
    w = max(1, len(ys) // 30)
    return [sum(ys[max(0, k - w): k + w + 1]) / len(ys[max(0, k - w): k + w + 1]) for k in range(len(ys))]


def training_chart(runs: list[dict], out: Path) -> dict | None:
    """train_loss.png: one panel per (objective, quantity) present, x = global optimizer step, dashed
    lines where an iteration begins. Returns what each panel shows (file, panels: title, y label,
    runs) or None without training logs."""
    panels = []
    for objective, key, title, ylabel, kind in TRAIN_PANELS:
        series = []
        for k, d in enumerate(runs):
            recs = [r for r in d["train"] if r.get("objective") == objective and r.get(key) is not None]
            if recs:
                series.append((k, d, recs))
        if series:
            panels.append({"title": title, "ylabel": ylabel, "kind": kind, "key": key, "series": series})
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    boundaries = {}
    for ax, p in zip(axes.flat, panels):
        for k, d, recs in p["series"]:
            xs = [r["step"] for r in recs]
            ys = [r[p["key"]] * (100 if p["kind"] == "pct" else 1) for r in recs]
            ax.plot(xs, ys, color=f"C{k}", alpha=0.3 if len(ys) > 60 else 1, lw=1)
            if len(ys) > 60:
                ax.plot(xs, _smooth(ys), color=f"C{k}", lw=1.8)
            starts = {}
            for r in recs:
                starts.setdefault(r["iteration"], r["step"])
            boundaries[d["name"]] = sorted(starts.values())
            for it, s in sorted(starts.items())[1:]:
                ax.axvline(s - 0.5, ls="--", color=f"C{k}", alpha=0.5, lw=0.8)
            for it, s in sorted(starts.items()):
                ax.annotate(f"i{it}", (s, 1), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                            va="top", xytext=(2, -2), textcoords="offset points")
        if p["kind"] == "pct":
            ax.set_ylim(0, 100)
        elif p["kind"] == "signed":
            ax.axhline(0, color="grey", lw=0.8)
        if p["title"] == "DPO loss":  # the loss of a policy that prefers neither candidate
            ax.axhline(math.log(2), ls=":", color="grey", lw=1)
            ax.annotate("ln 2", (1, math.log(2)), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        ha="right", va="bottom")
        ax.set_title(p["title"] + " (" + ", ".join(d["name"] for _, d, _ in p["series"]) + ")", fontsize=10)
        ax.set_xlabel("optimizer step (global)")
        ax.set_ylabel(p["ylabel"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.text(0.5, 0.005, "dashed: an iteration begins (iN); bold: moving average where steps are many",
             ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "train_loss.png", dpi=100)
    plt.close(fig)
    return {"file": "train_loss.png", "boundaries": boundaries,
            "panels": [{"title": p["title"], "ylabel": p["ylabel"], "runs": [d["name"] for _, d, _ in p["series"]]}
                       for p in panels]}


def rollout_chosen_chart(runs: list[dict], out: Path) -> dict | None:
    """rollout_chosen.png (PAPER Fig. 8): the share of pairs whose chosen candidate is a rollout, per
    iteration, with 95% Wilson intervals; an iteration whose rate is missing is marked "–", not 0."""
    with_pairs = [(k, d) for k, d in enumerate(runs) if d["pairs"]]
    if not with_pairs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    its = sorted({i for _, d in with_pairs for i in d["pairs"]})
    missing = {}
    for k, d in with_pairs:
        pts = [(i, 100 * p["rollout_chosen_rate"], [100 * x for x in _wilson(p["rollout_chosen_rate"], p["pairs"])]
                if p.get("pairs") else None)
               for i, p in sorted(d["pairs"].items()) if p.get("rollout_chosen_rate") is not None]
        if pts:
            _errorbars(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                       label=d["name"], color=f"C{k}")
        missing[d["name"]] = [i for i, p in sorted(d["pairs"].items()) if p.get("rollout_chosen_rate") is None]
        for i in missing[d["name"]]:
            ax.annotate(f"{MISSING}\nno rate", (i, 3), ha="center", va="bottom", color=f"C{k}", fontsize=9)
    _finish(ax, "Rollout chosen as the best candidate (PAPER Fig. 8)", "pairs whose chosen is a rollout (%)",
            "pct", its)
    ax.legend(fontsize=8)
    ax.text(0.99, 0.98, f"bars: 95% Wilson intervals; {MISSING}: no rate", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(out / "rollout_chosen.png", dpi=100)
    plt.close(fig)
    return {"file": "rollout_chosen.png", "missing": missing}


def reward_chart(d: dict, out: Path) -> dict | None:
    """reward_by_source.png: the judge's mean reward per candidate source and iteration (± 1.96 SE)."""
    if not d["rewards"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sources = sorted({s for r in d["rewards"].values() for s in r})
    for k, s in enumerate(sources):
        its = [i for i in sorted(d["rewards"]) if s in d["rewards"][i]]
        _errorbars(ax, its, [d["rewards"][i][s] for i in its], [d["reward_ci"].get(i, {}).get(s) for i in its],
                   label=s, color=f"C{k}")
    _finish(ax, f"Mean judge reward by candidate source ({d['name']})", "mean reward of a candidate", "signed",
            sorted(d["rewards"]))
    ax.legend(fontsize=8)
    ax.text(0.99, 0.01, "bars: mean ± 1.96 standard errors", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(out / "reward_by_source.png", dpi=100)
    plt.close(fig)
    return {"file": "reward_by_source.png", "sources": sources}


def _charts(runs: list[dict], out: Path) -> list[tuple[str, str]]:
    charts = []
    if any(d["evals"] for d in runs):
        charts.append(("Metrics per iteration", metrics_chart(runs, out)["file"]))
    for title, made in (("Rollout-chosen rate", rollout_chosen_chart(runs, out)),
                        ("Mean reward by candidate source", reward_chart(runs[0], out)),
                        ("Training", training_chart(runs, out))):
        if made:
            charts.append((title, made["file"]))
    return charts


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
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "charts": [png for _, png in charts], "header": header,
            "rows": rows, "comparison": cmp_lines}


# -- several world seeds -------------------------------------------------------------------------


def _last_summary(run_dir: Path) -> dict | None:
    its = [i for i in artifacts.iterations(run_dir) if artifacts.read_manifest(artifacts.stage_dir(run_dir, "eval", i))]
    return artifacts.read_manifest(artifacts.stage_dir(run_dir, "eval", its[-1]))["stats"] if its else None


def _spread(values: list, kind: str, seeds: int) -> str:
    """`57.1 (52.0–60.3)`: the mean over seeds and the range; the count where some seeds lack it."""
    vals = [v for v in values if v is not None]
    if not vals:
        return MISSING
    s = f"{_num(sum(vals) / len(vals), kind)} ({_num(min(vals), kind)}–{_num(max(vals), kind)})"
    return s + (f" [{len(vals)} of {seeds} seeds]" if len(vals) < seeds else "")


RATIOS = [c for c in COLUMNS if c.key in ("claim_precision", "true_claims_per_generation", "at_risk_unsafe_rate",
                                          "false_fact_rate")]


def replicate_table(run_groups: list[tuple[str, list[Path]]]) -> str:
    """Markdown: for each label (e.g. sipt, ntp), its runs' last-iteration metrics over the world seeds,
    as mean (min–max) and the number of seeds; a head-to-head row for each label whose runs were
    judged against another label's runs (an eval.baselines entry naming that run); and, for the first
    label against each other, the ratio of its metrics per seed. The groups list their runs in the
    same seed order (the ratios pair them by position)."""
    groups = [(label, [Path(p) for p in paths], [_last_summary(Path(p)) for p in paths]) for label, paths in run_groups]
    header = ["runs", "seeds", *[c.title for c in COLUMNS]]
    lines = ["Mean over world seeds (min–max); the last iteration of each run.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, _, sums in groups:
        have = [s for s in sums if s is not None]
        lines.append(f"| {label} | {len(have)} | " + " | ".join(
            _spread([value(s, c)[0] for s in have], c.kind, len(have)) for c in COLUMNS) + " |")
    for label, paths, sums in groups:
        for other, other_paths, _ in groups:
            if other == label:
                continue
            entries = []
            for s in sums:
                if s is None:
                    continue
                name = next((e for e in s.get("versus") or {} if any(_names_run(e, p) for p in other_paths)), None)
                entries.append((s["versus"][name], s.get("baseline") == name, s) if name else None)
            entries = [e for e in entries if e is not None]
            if not entries:
                continue
            cells = []
            for c in COLUMNS:
                if c.key in ("quality_win_rate", "coherence_win_rate"):
                    cells.append(_spread([e.get(c.key) for e, _, _ in entries], c.kind, len(entries)))
                elif c.key == "judge_invalid":
                    cells.append(_spread([e.get("judge_invalid", s.get("judge_invalid") if first else None)
                                          for e, first, s in entries], c.kind, len(entries)))
                else:
                    cells.append(MISSING)
            lines.append(f"| {label} vs {other} (head to head) | {len(entries)} | " + " | ".join(cells) + " |")
    if len(groups) > 1:
        label, _, sums = groups[0]
        lines += ["", f"Ratio {label} / other per seed (paired by position), mean (min–max):", "",
                  "| ratio | seeds | " + " | ".join(c.title for c in RATIOS) + " |", "|" + "---|" * (2 + len(RATIOS))]
        for other, _, other_sums in groups[1:]:
            pairs = [(a, b) for a, b in zip(sums, other_sums) if a is not None and b is not None]
            cells = []
            for c in RATIOS:
                ratios = [value(a, c)[0] / value(b, c)[0] for a, b in pairs
                          if value(a, c)[0] is not None and value(b, c)[0]]
                cells.append(_spread(ratios, "num", len(pairs)))
            lines.append(f"| {label} / {other} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
