"""`sipt loop`: every stage of every iteration, in order, skipping what is done.

The filesystem is the state machine (DESIGN §3): each stage's `_SUCCESS.json` says whether it is
done for the current config and inputs, so the loop simply calls every stage; a finished stage
returns at once, a stage whose inputs changed reruns, and a stage that failed resumes from its
finished parts. After a crash or a kill, running the same loop again continues at the failed stage.

Per iteration i: rollout (when rollouts are candidates), rewrite (when rewrites are candidates),
judge, pair, train -> iter-(i+1)/policy, then eval of that policy. With train.objective = "ntp"
(the next-token-prediction baseline) an iteration is only train and eval.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sipt.config import Config


def iteration_stages(cfg: Config) -> list[str]:
    """The stages one iteration runs under this config, in order."""
    if cfg.train.objective == "ntp":
        return ["train"]
    names = []
    if "rollouts" in cfg.judge.candidates:
        names.append("rollout")
    if "rewrite" in cfg.judge.candidates:
        names.append("rewrite")
    return [*names, "judge", "pair", "train"]


def plan(cfg: Config, iterations: int, evaluate: bool) -> list[tuple[str, int | None]]:
    """(stage, iteration) in the order the loop runs them."""
    steps: list[tuple[str, int | None]] = [("init", None), ("shard", None)]
    if evaluate:
        steps.append(("eval", 0))
    for i in range(iterations):
        steps += [(name, i) for name in iteration_stages(cfg)]
        if evaluate:
            steps.append(("eval", i + 1))
    return steps


def check(run_dir: Path, cfg: Config, iterations: int, evaluate: bool) -> None:
    """Every planned stage's checks (paths that must exist, engines), before the loop freezes its config."""
    import importlib

    for name in dict.fromkeys(name for name, _ in plan(cfg, iterations, evaluate)):
        module = importlib.import_module(f"stages.{name}")
        if hasattr(module, "check"):
            module.check(cfg, run_dir)


def run(run_dir: Path, cfg: Config, iterations: int, *, evaluate: bool = True,
        show_progress: bool = True) -> Iterator[tuple[str, int | None, dict]]:
    """Run the plan; yield (stage, iteration, manifest) after each stage."""
    import importlib

    for name, i in plan(cfg, iterations, evaluate):
        module = importlib.import_module(f"stages.{name}")
        if name == "init":
            manifest = module.run(run_dir, cfg)
        elif name == "shard":
            manifest = module.run(run_dir, cfg, show_progress=show_progress)
        else:
            manifest = module.run(run_dir, cfg, i, show_progress=show_progress)
        yield name, i, manifest
