"""The `sipt` commands that read a run or a config instead of running a stage: replicate-report,
check-warm-start, report, plan, world, status and `config show|reference`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sipt import config as config_mod
from sipt.cli_common import ConfigOpt, RunOpt, SetOpt, app, out, overrides
from sipt.errors import SiptError


@app.command("replicate-report")
def replicate_report(
    roots: Annotated[list[Path], typer.Argument(help="Demo folders, one per world seed, each with sipt/ and ntp/ runs.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the Markdown here.")] = None,
):
    """Mean and spread over world seeds of the demo's SIPT and NTP runs (what `make replicate` prints)."""
    from stages import report as stage

    missing = [r for r in roots if not (r / "sipt").exists() or not (r / "ntp").exists()]
    if missing:
        raise SiptError(f"{missing[0]}: no sipt/ and ntp/ runs here; run `make loop RUN={missing[0]}` first")
    md = stage.replicate_table([("sipt", [r / "sipt" for r in roots]), ("ntp", [r / "ntp" for r in roots])])
    if out_file:
        out_file.write_text(md + "\n")
    print(md)


# The warm start the demo's SIPT and NTP runs continue from must know its facts and write text, not
# loops (issue #12): otherwise win rates compare loops with loops. (summary key, label, bound, >= or <=)
WARM_START_CHECKS = [
    ("claim_precision", "claim precision % (true / all fact claims)", 50.0, ">="),
    ("benchmark_avg", "MC accuracy % (sipt_world_mc)", 80.0, ">="),
    ("repeat_share", "greedy generations that repeat a sentence %", 20.0, "<="),
]


@app.command("check-warm-start")
def check_warm_start(
    run: RunOpt,
    iteration: Annotated[int, typer.Option("--iter", min=0, help="The evaluated iteration whose policy is checked.")] = 0,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a check fails (default: warn).")] = False,
):
    """Check that an evaluated policy is a usable warm start: it states mostly true facts, passes the
    toy world's MC task and does not loop (thresholds in the table)."""
    from sipt import artifacts

    m = artifacts.read_manifest(artifacts.stage_dir(run, "eval", iteration))
    if m is None:
        raise SiptError(f"{run}: iteration {iteration} has no finished eval; run `sipt eval --run {run} --iter {iteration}`")
    stats = m["stats"]
    table = Table(title=f"warm start: {escape(str(run))} iter {iteration} ({stats.get('n', '?')} held-out prompts, 1 seed)")
    for col in ("check", "value [95% CI]", "needed", "result"):
        table.add_column(col)
    failed = {}  # key -> label
    for key, label, bound, op in WARM_START_CHECKS:
        v = stats.get(key)
        ci = (stats.get("ci") or {}).get(key)
        ok = v is not None and (v >= bound if op == ">=" else v <= bound)
        if not ok:
            failed[key] = label
        shown = "–" if v is None else f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
        table.add_row(label, shown, f"{op} {bound:g}", "[green]pass[/]" if ok else "[red]FAIL[/]")
    out.print(table)
    if failed:
        out.print(f"[yellow]warning:[/] the warm start fails: {escape(', '.join(failed.values()))}; SIPT-vs-NTP "
                  "results from it compare weak policies")
        if set(failed) - {"repeat_share"}:
            out.print("  facts or MC: train it longer (WARM_ITERS) or use a smaller world")
        if "repeat_share" in failed:
            out.print(f"  repeats: `python bench/greedy_repeats.py --run {escape(str(run))} --iter {iteration}` shows "
                      "what repeats and whether the policy, sentence by sentence, prefers new text (greedy decoding "
                      "commits one token at a time); on the demo, twice the epochs removed few repeats and documents "
                      "that state their facts in order (world.ordered_rate) removed most (README, \"Ordered documents\")")
        if strict:
            raise typer.Exit(1)


@app.command()
def report(
    run: RunOpt,
    compare: Annotated[Optional[list[Path]], typer.Option(
        "--compare", help="Another run to compare with (e.g. the NTP baseline; repeatable).")] = None,
):
    """Write <run>/report/report.md with the metrics table (PAPER Table 1 shape) and PNG charts."""
    from stages import report as stage

    if not run.exists():
        raise SiptError(f"{run}: no such run directory")
    for c in compare or []:
        if not c.exists():
            raise SiptError(f"--compare {c}: no such run directory")
    result = stage.run(run, compare)
    table = Table(title=f"sipt report: {escape(str(run))}")
    for col in result["header"]:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in result["rows"]:
        table.add_row(*map(escape, row))
    wide = out if out.is_terminal else Console(width=160)  # logs: no wrapped table cells
    wide.print(table)
    for line in result["comparison"]:
        wide.print(escape(line), highlight=False, soft_wrap=True)
    out.print(f"[green]report[/] {escape(str(result['report']))} ({len(result['charts'])} charts)")


@app.command()
def plan(
    config: Annotated[Path, typer.Option("--config", "-c", help="The TOML config to cost.")],
    set_: SetOpt = None,
    prefix_tokens: Annotated[Optional[int], typer.Option(help="Mean prefix length (default: middle of the prefix range).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (for a README).")] = False,
):
    """Cost of a config per optimizer step and per run: tokens generated, judge calls, judge tokens."""
    from sipt import plan as plan_mod

    cfg = config_mod.build(config_mod.apply_overrides(config_mod.load_toml(config), set_ or []), str(config))
    t = plan_mod.table(cfg, prefix_tokens)
    h = plan_mod.human
    head = ["scheme", "rollouts", "candidates", "generated tok/step", "judge calls/step", "judge tok/step",
            "generated tok/run", "judge calls/run", "judge tok/run"]
    cells = [[r["scheme"] + (" ◀" if r["configured"] else ""), str(r["rollouts"]), str(r["candidates"]),
              h(r["step_generated"]), h(r["step_calls"]), h(r["step_judge_tokens"]), h(r["run_generated"]),
              h(r["run_calls"]), h(r["run_judge_tokens"])] for r in t["rows"]]
    about = (f"{t['steps']} optimizer steps of {t['batch']} prefixes; objectives {', '.join(t['objectives'])}; "
             f"candidates {', '.join(t['candidates'])}; judge mode {t['mode']}, swap {t['swap']}, repeats "
             f"{t['repeats']}; mean prefix {t['prefix_tokens']} tokens. ◀ = the configured scheme and rollouts.")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|" + "---:|" * (len(head) - 1))
        for c in cells:
            print("| " + " | ".join(c) + " |")
        print()
        print(about)
        return
    table = Table(title=f"sipt plan: {escape(str(config))}")
    for col in head:
        table.add_column(col, justify="left" if col == "scheme" else "right")
    for c in cells:
        table.add_row(*c)
    out.print(table)
    out.print(escape(about), highlight=False)


@app.command()
def world(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the knowledge base, corpus and MC task.")],
    seed: Annotated[Optional[int], typer.Option(help="Generator seed (world.seed).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Generate the toy world: knowledge base, corpus with known false/unsafe sentences, MC task."""
    from sipt import world as world_mod

    base = config_mod.load_toml(config) if config else {}
    cfg = config_mod.build(config_mod.apply_overrides(base, overrides(set_, {"world.seed": seed}))).world
    done = out_dir / "stats.json"
    if done.exists() and world_mod.same_world_config(json.loads(done.read_text()).get("config") or {}, cfg):
        stats = json.loads(done.read_text())
        out.print(f"[green]world[/] {escape(str(out_dir))} already holds this world (same config); skipped")
    else:
        stats = world_mod.generate_world(cfg, out_dir)
    out.print(world_mod.world_stats_table(stats))


@app.command()
def status(
    run: RunOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Show done / stale / failed / interrupted / running / missing for every stage of every iteration."""
    from sipt import artifacts

    if not run.exists():
        raise SiptError(f"{run}: no such run directory")
    frozen = run / config_mod.FROZEN
    cfg = config_mod.build(config_mod.load_toml(frozen), str(frozen)) if frozen.exists() else None
    rows = artifacts.run_status(run, cfg.hash if cfg else None, cfg)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"sipt status: {escape(str(run))}")
    for col in ("iter", "stage", "state", "rows", "time (s)", "detail"):
        table.add_column(col, justify="right" if col in ("rows", "time (s)") else "left")
    colors = {"done": "green", "stale": "yellow", "failed": "red", "interrupted": "red", "running": "cyan",
              "missing": "dim"}
    for r in rows:
        table.add_row(
            "" if r["iteration"] is None else str(r["iteration"]),
            r["stage"],
            f"[{colors[r['state']]}]{r['state']}[/]",
            "" if r["rows"] is None else str(r["rows"]),
            "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            escape(str(r["detail"])[:60]),
        )
    out.print(table)
    for r in rows:
        if r["warning"]:  # README "Reproducibility": such a stage is equivalent, not bit-identical
            out.print(f"[yellow]warning:[/] {escape(r['path'])}: {escape(r['warning'])}")


config_app = typer.Typer(help="Show a run's resolved config or the reference of every key.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None):
    """Print the config a command would run with (without freezing anything new)."""
    frozen = run / config_mod.FROZEN
    base = config_mod.load_toml(config) if config else (config_mod.load_toml(frozen) if frozen.exists() else {})
    print(config_mod.build(config_mod.apply_overrides(base, set_ or [])).to_toml())


@config_app.command("reference")
def config_reference(
    readme: Annotated[Optional[Path], typer.Option(help="Rewrite this README's reference section instead of printing.")] = None,
):
    """Print every config key with its default and meaning (Markdown)."""
    if readme is None:
        print(config_mod.reference_markdown())
        return
    readme.write_text(config_mod.readme_with_reference(readme.read_text()))
