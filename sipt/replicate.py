"""Replicates: several runs per label (one per world seed) summarised over the seeds.

For each label (e.g. sipt, ntp) its runs' last-iteration eval metrics as mean (min–max); a
head-to-head row where one label's runs were judged against another's; and the first label's
metrics over each other's, per seed. `sipt replicate-report` prints it through
stages/report.replicate_table, which passes the report's metric columns (key, title, kind), how it
reads one from a summary (`value`) and how it prints a number (`num`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sipt import artifacts
from sipt.charts import MISSING

# The columns the per-seed ratio table shows (the rates and counts a ratio makes sense of).
RATIO_KEYS = ("claim_precision", "true_claims_per_generation", "at_risk_unsafe_rate", "false_fact_rate")


def names_run(entry: str, run: Path) -> bool:
    """Whether an eval.baselines entry is the run folder `run` (as given, or its last two parts)."""
    if entry == "initial":
        return False
    p = Path(entry)
    return p.resolve() == Path(run).resolve() or (len(p.parts) >= 2 and p.parts[-2:] == Path(run).parts[-2:])


def last_summary(run_dir: Path) -> dict | None:
    """The eval summary of the run's last evaluated iteration, or None where none was evaluated."""
    its = artifacts.finished(run_dir, "eval")
    return artifacts.read_manifest(artifacts.stage_dir(run_dir, "eval", its[-1]))["stats"] if its else None


def spread(values: list, kind: str, seeds: int, num: Callable[..., str]) -> str:
    """`57.1 (52.0–60.3)`: the mean over seeds and the range; the count where some seeds lack it."""
    vals = [v for v in values if v is not None]
    if not vals:
        return MISSING
    s = f"{num(sum(vals) / len(vals), kind)} ({num(min(vals), kind)}–{num(max(vals), kind)})"
    return s + (f" [{len(vals)} of {seeds} seeds]" if len(vals) < seeds else "")


def replicate_table(run_groups: list[tuple[str, list[Path]]], columns: list, value: Callable,
                    num: Callable[..., str]) -> str:
    """Markdown: for each label (e.g. sipt, ntp), its runs' last-iteration metrics over the world seeds,
    as mean (min–max) and the number of seeds; a head-to-head row for each label whose runs were
    judged against another label's runs (an eval.baselines entry naming that run); and, for the first
    label against each other, the ratio of its metrics per seed. The groups list their runs in the
    same seed order (the ratios pair them by position). `columns`: the metrics (key, title, kind) in
    table order; `value(summary, column)` -> (value, interval); `num(value, kind)` prints a number."""
    ratio_columns = [c for c in columns if c.key in RATIO_KEYS]
    groups = [(label, [Path(p) for p in paths], [last_summary(Path(p)) for p in paths]) for label, paths in run_groups]
    header = ["runs", "seeds", *[c.title for c in columns]]
    lines = ["Mean over world seeds (min–max); the last iteration of each run.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, _, sums in groups:
        have = [s for s in sums if s is not None]
        lines.append(f"| {label} | {len(have)} | " + " | ".join(
            spread([value(s, c)[0] for s in have], c.kind, len(have), num) for c in columns) + " |")
    for label, paths, sums in groups:
        for other, other_paths, _ in groups:
            if other == label:
                continue
            entries = []
            for s in sums:
                if s is None:
                    continue
                name = next((e for e in s.get("versus") or {} if any(names_run(e, p) for p in other_paths)), None)
                entries.append((s["versus"][name], s.get("baseline") == name, s) if name else None)
            entries = [e for e in entries if e is not None]
            if not entries:
                continue
            cells = []
            for c in columns:
                if c.key in ("quality_win_rate", "coherence_win_rate"):
                    cells.append(spread([e.get(c.key) for e, _, _ in entries], c.kind, len(entries), num))
                elif c.key == "judge_invalid":
                    cells.append(spread([e.get("judge_invalid", s.get("judge_invalid") if first else None)
                                         for e, first, s in entries], c.kind, len(entries), num))
                else:
                    cells.append(MISSING)
            lines.append(f"| {label} vs {other} (head to head) | {len(entries)} | " + " | ".join(cells) + " |")
    if len(groups) > 1:
        label, _, sums = groups[0]
        lines += ["", f"Ratio {label} / other per seed (paired by position), mean (min–max):", "",
                  "| ratio | seeds | " + " | ".join(c.title for c in ratio_columns) + " |",
                  "|" + "---|" * (2 + len(ratio_columns))]
        for other, _, other_sums in groups[1:]:
            pairs = [(a, b) for a, b in zip(sums, other_sums) if a is not None and b is not None]
            cells = []
            for c in ratio_columns:
                ratios = [value(a, c)[0] / value(b, c)[0] for a, b in pairs
                          if value(a, c)[0] is not None and value(b, c)[0]]
                cells.append(spread(ratios, "num", len(pairs), num))
            lines.append(f"| {label} / {other} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
