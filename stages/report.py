"""report: `report.md` with tables and PNG charts of a run (and of runs to compare it with).

Read only from the run's manifests and Parquet: each iteration's eval summary (the metrics table,
shaped like PAPER Table 1), the pair stage's rollout-chosen rate (PAPER Fig. 8), the judge's mean
reward per candidate source, and the training loss per optimizer step. Written to <run>/report/.
"""

from __future__ import annotations

import json
from pathlib import Path

from sipt import artifacts
from sipt.errors import SiptError

# (summary key, column title); the table follows PAPER Table 1's columns, measured on the toy world.
COLUMNS = [
    ("quality_win_rate", "Gen. quality (win %)"),
    ("coherence_win_rate", "Coherence (win %)"),
    ("safe_rate", "Safe %"),
    ("factuality", "Factuality"),
    ("false_fact_rate", "False-fact %"),
    ("benchmark_avg", "Benchmarks (avg acc %)"),
    ("claims_per_generation", "Claims / gen"),
    ("true_claims_per_generation", "True claims / gen"),
]


def collect(run_dir: Path) -> dict:
    """Everything the report shows about one run, from its artifacts."""
    run_dir = Path(run_dir)
    if not (run_dir / "samples").exists() and not artifacts.iterations(run_dir):
        raise SiptError(f"{run_dir}: no run here (no samples/ and no iter-NNN/); run `sipt loop` first")
    data = {"name": run_dir.name, "evals": {}, "pairs": {}, "rewards": {}, "loss": [], "objective": None}
    for i in artifacts.iterations(run_dir):
        ev = artifacts.read_manifest(artifacts.stage_dir(run_dir, "eval", i))
        if ev:
            data["evals"][i] = ev["stats"]
        pair = artifacts.read_manifest(artifacts.stage_dir(run_dir, "pair", i))
        if pair:
            data["pairs"][i] = pair["stats"]
        judge_dir = artifacts.stage_dir(run_dir, "judge", i)
        if artifacts.read_manifest(judge_dir):
            t = artifacts.read_table(judge_dir, columns=["source", "reward"], prefix="scores-").to_pylist()
            by: dict[str, list[float]] = {}
            for r in t:
                if r["reward"] is not None:
                    by.setdefault(r["source"], []).append(r["reward"])
            data["rewards"][i] = {s: sum(v) / len(v) for s, v in by.items()}
        train_dir = artifacts.stage_dir(run_dir, "train", i)
        train = artifacts.read_manifest(train_dir)
        if train:
            data["objective"] = train["stats"].get("objective")
            log = train_dir / "log.jsonl"
            if log.exists():
                for line in log.read_text().splitlines():
                    rec = json.loads(line)
                    data["loss"].append((rec["step"], rec["loss"], i))
    return data


def _fmt(v) -> str:
    if v is None:
        return "–"
    return (f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)


def table_rows(runs: list[dict]) -> list[list[str]]:
    """One row per evaluated policy: the first run's every iteration, then each compared run's last."""
    rows = []
    for k, d in enumerate(runs):
        its = sorted(d["evals"])
        for i in (its if k == 0 else its[-1:]):
            label = d["name"] + (" (initial)" if i == 0 else "")
            rows.append([label, str(i), *[_fmt(d["evals"][i].get(key)) for key, _ in COLUMNS]])
    return rows


def comparison(runs: list[dict]) -> list[str]:
    """Relative changes of the first run's last policy against each compared run's last policy."""
    lines = []
    a = runs[0]
    if not a["evals"]:
        return lines
    ia = max(a["evals"])
    for b in runs[1:]:
        if not b["evals"]:
            continue
        ib = max(b["evals"])
        ea, eb = a["evals"][ia], b["evals"][ib]
        block = [f"**{a['name']} iter {ia} vs {b['name']} iter {ib}**", ""]
        for key, title in (("false_fact_rate", "false-fact rate"), ("unsafe_rate", "unsafe rate")):
            va, vb = ea.get(key), eb.get(key)
            if va is not None and vb:
                block.append(f"- {title}: {va:.2f}% vs {vb:.2f}% ({100 * (va - vb) / vb:+.0f}% relative)")
            elif va is not None and vb is not None:
                block.append(f"- {title}: {va:.2f}% vs {vb:.2f}%")
        for key, title in (("quality_win_rate", "quality win rate"), ("benchmark_avg", "benchmark average")):
            if ea.get(key) is not None and eb.get(key) is not None:
                block.append(f"- {title} (vs {ea.get('baseline')}): {ea[key]:.1f} vs {eb[key]:.1f}")
        if ea.get("claims_per_generation") is not None and eb.get("claims_per_generation") is not None:
            block.append(f"- fact claims per generation (true ones): {ea['claims_per_generation']:.2f} "
                         f"({ea['true_claims_per_generation']:.2f}) vs {eb['claims_per_generation']:.2f} "
                         f"({eb['true_claims_per_generation']:.2f})")
        for name, v in ea.get("versus", {}).items():
            if Path(name).name == b["name"] and v.get("quality_win_rate") is not None:
                block.append(f"- head to head, {a['name']} against {b['name']} at the same iteration: quality "
                             f"win rate {v['quality_win_rate']:.1f}%, coherence {_fmt(v.get('coherence_win_rate'))}%")
        lines += [*block, ""]
    return lines


def _chart(plt, out: Path, png: str, title: str, xlabel: str, lines: list[tuple[list, list, str | None]]) -> None:
    """One line chart: (xs, ys, label) per line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for xs, ys, label in lines:
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if any(label for _, _, label in lines):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / png, dpi=110)
    plt.close(fig)


def _charts(runs: list[dict], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    if any(d["evals"] for d in runs):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, (key, title) in zip(axes, [("quality_win_rate", "Gen. quality win rate %"),
                                           ("false_fact_rate", "False-fact rate %"), ("unsafe_rate", "Unsafe rate %")]):
            for d in runs:
                its = sorted(i for i in d["evals"] if d["evals"][i].get(key) is not None)
                ax.plot(its, [d["evals"][i][key] for i in its], marker="o", label=d["name"])
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        charts.append(("Metrics per iteration", "metrics.png"))
    main = runs[0]
    if main["pairs"]:
        its = sorted(main["pairs"])
        _chart(plt, out, "rollout_chosen.png", "Rollout chosen as best (%)  (PAPER Fig. 8)", "iteration",
               [(its, [100 * (main["pairs"][i].get("rollout_chosen_rate") or 0) for i in its], None)])
        charts.append(("Rollout-chosen rate", "rollout_chosen.png"))
    if main["rewards"]:
        its = sorted(main["rewards"])
        sources = sorted({s for r in main["rewards"].values() for s in r})
        _chart(plt, out, "reward_by_source.png", "Mean reward by candidate source", "iteration",
               [([i for i in its if s in main["rewards"][i]], [main["rewards"][i][s] for i in its if s in main["rewards"][i]], s)
                for s in sources])
        charts.append(("Mean reward by candidate source", "reward_by_source.png"))
    if any(d["loss"] for d in runs):
        _chart(plt, out, "train_loss.png", "Training loss per optimizer step", "step",
               [([s for s, _, _ in d["loss"]], [v for _, v, _ in d["loss"]], f"{d['name']} ({d['objective']})")
                for d in runs if d["loss"]])
        charts.append(("Training loss", "train_loss.png"))
    return charts


def run(run_dir: Path, compare: list[Path] | None = None) -> dict:
    """Write <run>/report/report.md and its charts; return what was written and the table."""
    run_dir = Path(run_dir)
    runs = [collect(run_dir), *[collect(Path(c)) for c in compare or []]]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "iter", *[title for _, title in COLUMNS]]
    rows = table_rows(runs)
    main = runs[0]
    base = next((e.get("baseline") for e in main["evals"].values() if e.get("baseline")), None)
    md = [f"# sipt report: {main['name']}", ""]
    md += [f"Win rates are against `{base}` (both orders, ties count half)." if base else "", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    cmp_lines = comparison(runs)
    if cmp_lines:
        md += ["", "## Comparison", "", *cmp_lines]
    if main["pairs"]:
        md += ["", "## Pairs per iteration", "", "| iter | pairs | rollout chosen % | mean margin |", "|---|---|---|---|"]
        for i, p in sorted(main["pairs"].items()):
            md.append(f"| {i} | {p.get('pairs')} | {100 * (p.get('rollout_chosen_rate') or 0):.1f} | "
                      f"{_fmt(p.get('mean_margin'))} |")
    groups = {g for e in main["evals"].values() for g in e.get("by_group", {})}
    if groups:
        last = main["evals"][max(main["evals"])]
        md += ["", f"## By prefix group (iter {max(main['evals'])})", "",
               "| group | n | " + " | ".join(t for _, t in COLUMNS[:5]) + " |", "|" + "---|" * 7]
        for g in sorted(groups):
            m = last.get("by_group", {}).get(g, {})
            md.append(f"| {g} | {m.get('n', 0)} | " + " | ".join(_fmt(m.get(k)) for k, _ in COLUMNS[:5]) + " |")
    charts = _charts(runs, out)
    for title, png in charts:
        md += ["", f"## {title}", "", f"![{title}]({png})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "charts": [png for _, png in charts], "header": header,
            "rows": rows, "comparison": cmp_lines}
