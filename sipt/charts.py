"""The report's PNG charts: metrics per iteration, training curves, rollout-chosen rate, reward by source.

Each chart reads runs as stages/report.collect returns them (per run: its name, eval summaries,
pair stats, judge rewards and training log by iteration) and writes one PNG into the report folder
(matplotlib, Agg backend), returning what it drew so tests can check the panels without the image.
A metrics panel reads each point through `point(summary, key)` -> (value, 95% interval or None),
the way the report's main table reads the summary. A value that was not measured is drawn as
MISSING, never as 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

MISSING = "–"  # a value that was not measured (the report's tables print the same)

Point = Callable[[dict, str], tuple]  # (eval summary, metric key) -> (value, interval or None)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion p out of n (the rollout-chosen rate over n pairs)."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


# (summary key, panel title, y label, kind): the per-iteration panels; pct panels share a 0-100 axis.
PANELS = [
    ("quality_win_rate", "Generation quality", "win rate vs baseline (%)", "pct"),
    ("coherence_win_rate", "Coherence", "win rate vs baseline (%)", "pct"),
    ("claim_precision", "Claim precision", "true claims / all claims (%)", "pct"),
    ("true_claims_per_generation", "True claims per generation", "true claims per generation", "num"),
    ("repeat_share", "Repetition", "generations that repeat a sentence (%)", "pct"),
    ("at_risk_unsafe_rate", "Unsafe continuations (at-risk prompts)", "unsafe (%)", "pct"),
    ("at_risk_recovered_rate", "Safe, well-formed continuations (at-risk)", "safe & well formed (%)", "pct"),
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


def metrics_chart(runs: list[dict], out: Path, point: Point) -> dict:
    """metrics.png: one panel per PANELS entry, a line per run with 95% interval bars."""
    plt = _pyplot()
    cols = 4
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.75 * rows), squeeze=False)
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    its = sorted({i for d in runs for i in d["evals"]})
    drawn = {}
    for ax, (key, title, ylabel, kind) in zip(axes.flat, PANELS):
        names = []
        for k, d in enumerate(runs):
            dodge = 0.06 * (k - (len(runs) - 1) / 2)  # runs side by side, so their bars do not hide each other
            pts = [(i + dodge, *point(s, key)) for i, s in sorted(d["evals"].items())
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
        pts = [(i, 100 * p["rollout_chosen_rate"],
                [100 * x for x in wilson_interval(p["rollout_chosen_rate"], p["pairs"])] if p.get("pairs") else None)
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


def rewriter_chart(curves: list[dict], out: Path) -> dict | None:
    """rewriter_train.png (PAPER Figs. 6-7): the rewriter's validation curves per training step: on
    safe suffixes the exact-copy rate and token overlap, on unsafe ones the mean reward, the judge-safe
    rate and token overlap (all in %)."""
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("Safe suffixes (copy)", (("val_safe_exact", "exact copy"), ("val_safe_overlap", "token overlap"))),
              ("Unsafe suffixes (rewrite)", (("val_unsafe_reward", "mean reward"), ("val_unsafe_safe", "judged safe"),
                                             ("val_unsafe_overlap", "token overlap"))))
    drawn = {}
    for ax, (title, keys) in zip(axes, panels):
        for k, (key, label) in enumerate(keys):
            pts = [(c["step"], 100 * c[key]) for c in curves if c.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=f"C{k}")
                drawn[key] = len(pts)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rewriter_train.png", dpi=100)
    plt.close(fig)
    return {"file": "rewriter_train.png", "drawn": drawn}


def write_charts(runs: list[dict], out: Path, point: Point) -> list[tuple[str, str]]:
    """Every chart the runs have data for, written into `out`: (section title, PNG file name)."""
    charts = []
    if any(d["evals"] for d in runs):
        charts.append(("Metrics per iteration", metrics_chart(runs, out, point)["file"]))
    for title, made in (("Rollout-chosen rate", rollout_chosen_chart(runs, out)),
                        ("Mean reward by candidate source", reward_chart(runs[0], out)),
                        ("Training", training_chart(runs, out))):
        if made:
            charts.append((title, made["file"]))
    return charts
