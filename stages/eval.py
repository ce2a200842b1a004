"""eval: measure an iteration's policy the way the paper does (§8), with any judge engine.

Generation, here: the policy continues held-out prefixes greedily, and each baseline (`eval.baselines`)
the same prefixes, computed once per baseline model and cached in <run>/cache/eval/. Judging and the
summary (sipt/evaluation.py): pairwise objectives as win rates against each baseline in both orders,
pointwise ones with the metrics they declare (sipt/objectives.py); judge calls are cached in
<run>/cache/judge.sqlite. lm-eval benchmarks (`eval.tasks`) run through `lm_eval.simple_evaluate` on
the policy folder.

The toy world (judge.engine = "oracle") adds metrics no judge decides (sipt/oracle_metrics.py):
ground-truth claim counts per generation (the gt_* columns) and an at-risk safety set (held-out
prefixes cut 1-3 words into an unsafe sentence, at most `eval.at_risk_prompts`).
Output: `generations-00000.parquet` (one row per prefix), `versus-00000.parquet` (one row per
prefix and baseline), `at_risk-00000.parquet` (one row per at-risk prefix; empty when off),
`summary.json` (also the stats of `_SUCCESS.json`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sipt import artifacts, evaluation, objectives, oracle_metrics
from sipt.config import Config, check_model
from sipt.engines import ENGINES, Sampling, make_engine, policy_engines
from sipt.errors import SiptError
from sipt.objectives import OBJECTIVES
from sipt.oracle_metrics import AT_RISK, GT, at_risk_set  # noqa: F401 - re-exported
from sipt.progress import progress_bar
from sipt.samples import derive_seed, policy_prompt, read_samples, tokenizer_bos
from sipt.world import oracle_inputs, oracle_kb

GENERATIONS = evaluation.generations_schema()  # with the built-in objectives
VERSUS = evaluation.versus_schema()
JUDGE_KEYS = ["judge.engine", "judge.model", "judge.dtype", "judge.templates", "judge.mode", "judge.chat",
              "judge.top_p", "judge.max_new_tokens", "judge.parse_retries", "judge.noise", "judge.world",
              "judge.base_url"]
SECTIONS = ["run.seed", "data.suffix_tokens", "eval", *JUDGE_KEYS]


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work (and before the command freezes its config): values, the
    generating and judging models, the oracle's world, baseline folders."""
    e = cfg.eval
    bad = [o for o in e.objectives if o not in OBJECTIVES]
    if bad:
        raise SiptError(f"eval.objectives: unknown {bad[0]!r}; objectives are {', '.join(OBJECTIVES)}")
    if e.engine in ENGINES and not ENGINES[e.engine].policy:
        raise SiptError(f"eval.engine = '{e.engine}': the {e.engine} only judges; the policy generates with "
                        f"{policy_engines()}")
    if e.prompts < 1 or e.judge_seeds < 1:
        raise SiptError("eval.prompts and eval.judge_seeds must be >= 1")
    if e.at_risk_prompts < 0:
        raise SiptError("eval.at_risk_prompts must be >= 0 (0: no at-risk safety set)")
    pairwise = any(OBJECTIVES[o].pairwise for o in e.objectives)
    if pairwise and not e.baselines:
        raise SiptError(f"eval.baselines is empty, but {' / '.join(objectives.pairwise())} are win rates against "
                        "a baseline")
    if cfg.judge.engine != "oracle" and not cfg.judge.model:
        raise SiptError("judge.model is empty: eval judges with the [judge] section's engine and model")
    check_model("eval", e, required=False)
    if cfg.judge.engine == "oracle":
        oracle_kb(cfg.judge.world, run_dir, "judge", "judge.world")
    elif e.objectives:
        check_model("judge", cfg.judge)
    for entry in e.baselines if pairwise else []:
        if entry != "initial" and not Path(entry).exists():
            raise SiptError(f"eval.baselines: {entry} does not exist (yet). Make it first (a run: `sipt loop "
                            f"--run {entry}`), or leave it out of eval.baselines")


def resolve_baseline(run_dir: Path, entry: str, iteration: int) -> tuple[Path, str]:
    """The model folder of an eval.baselines entry, and its input reference."""
    if entry == "initial":
        return artifacts.stage_dir(run_dir, "policy", 0), artifacts.stage_ref("policy", 0)
    path = Path(entry)
    if not path.exists():
        raise SiptError(f"eval.baselines: {entry} does not exist (yet). Make it first (a run: `sipt loop --run "
                        f"{entry}`), or leave it out of eval.baselines")
    if (path / "sipt.toml").exists():  # another run: its policy after the same number of iterations
        policy = artifacts.stage_dir(path, "policy", iteration)
        if artifacts.read_manifest(policy) is None:
            raise SiptError(f"eval.baselines: run {entry} has no finished {artifacts.stage_ref('policy', iteration)} yet; "
                            f"run its iterations first (`sipt loop --run {entry}`)")
        return policy, str(policy.resolve())
    if (path / "config.json").exists():
        return path, artifacts.files_ref([path])
    raise SiptError(f"eval.baselines: {entry!r} is neither 'initial', a run folder (with sipt.toml) "
                    "nor a Hugging Face model folder (with config.json)")


def eval_samples(run_dir: Path, cfg: Config) -> list[dict]:
    e = cfg.eval
    table = read_samples(run_dir)
    table = table.filter(pc.equal(table["split"], e.split))
    if table.num_rows == 0:
        raise SiptError(f"{run_dir}/samples: no '{e.split}' samples to evaluate on; set data.eval_fraction "
                        "(or data.split_column) and rerun `sipt shard --force`")
    cols = ["sample_id", "prefix_ids", "prefix_start", "prefix_text", "suffix_text", "meta"]
    rows = table.slice(0, e.prompts).select(cols).to_pylist()
    for r in rows:
        meta = json.loads(r.pop("meta") or "{}")
        r["group"] = str(meta.get(e.group_by, "")) if e.group_by else ""
    return rows


def same_tokenizer(a: Path, b: Path) -> bool:
    fa, fb = Path(a) / "tokenizer.json", Path(b) / "tokenizer.json"
    return fa.exists() and fb.exists() and fa.read_bytes() == fb.read_bytes()


def prompt_encoder(model_dir: Path, cfg: Config, run_dir: Path):
    """A function row -> the prompt token ids the model in `model_dir` continues: the row's
    `prefix_ids` when the model shares the run's tokenizer, else its `prefix_text` encoded by the
    model's tokenizer (also for rows without ids: the at-risk set); a BOS when the prefix starts
    the document (`prefix_start` 0), left-truncated to leave room for the new tokens."""
    from transformers import AutoConfig, AutoTokenizer

    max_new = cfg.new_tokens("eval")
    tok = AutoTokenizer.from_pretrained(model_dir)
    context = int(getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 0) or 1 << 30)
    if context <= max_new:
        raise SiptError(f"{model_dir}: context {context} leaves no room for {max_new} new tokens")
    bos = tokenizer_bos(tok)
    start = bos if bos is not None else tok.eos_token_id
    own = same_tokenizer(model_dir, artifacts.stage_dir(run_dir, "policy", 0))

    def encode(r: dict) -> list[int]:
        if own and r.get("prefix_ids") is not None:
            prefix = r["prefix_ids"]
        else:
            prefix = tok(r["prefix_text"], add_special_tokens=False).input_ids
        ids, _ = policy_prompt(prefix, r["prefix_start"], bos, context - max_new)
        return ids or [start]

    return encode


def generate_prompts(model_dir: Path, prompt_sets: list[list[list[int]]], cfg: Config, seed: int) -> list[list]:
    """Greedy continuations (one Generation per prompt) of each set of token-id prompts, by one
    engine on the model in `model_dir` (or eval.model). Each set is its own generate call, so a
    set's generations do not depend on the other sets (batches never mix them)."""
    e = cfg.eval
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.new_tokens("eval"), seed=seed)
    if not any(prompt_sets):
        return [[] for _ in prompt_sets]
    engine = make_engine(e, e.model or str(model_dir))
    try:
        return [[g[0] for g in engine.generate(p, sampling)] if p else [] for p in prompt_sets]
    finally:
        engine.close()


def generate_sets(model_dir: Path, row_sets: list[list[dict]], cfg: Config, seed: int, run_dir: Path) -> list[list]:
    """Greedy continuations of each set of rows' prefixes (`prompt_encoder`), one engine for all."""
    encode = prompt_encoder(model_dir, cfg, run_dir)
    return generate_prompts(model_dir, [[encode(r) for r in rows] for rows in row_sets], cfg, seed)


def generate(model_dir: Path, rows: list[dict], cfg: Config, seed: int, run_dir: Path) -> list:
    """Greedy continuations of the rows' prefixes by the model in `model_dir`. A model with another
    tokenizer than the run's policy (a baseline of another family) gets the prefix text re-encoded."""
    return generate_sets(model_dir, [rows], cfg, seed, run_dir)[0]


def cached_generations(run_dir: Path, model_dir: Path, rows: list[dict], cfg: Config, seed: int) -> list[dict]:
    """A baseline's generations, computed once per model, prefixes and generation settings. The model
    is keyed by its files' contents, so a copied or moved run (or baseline) reuses the cache."""
    e = cfg.eval
    key = json.dumps([artifacts.content_fingerprint(model_dir), [r["sample_id"] for r in rows],
                      cfg.new_tokens("eval"), e.engine, e.model, e.dtype, seed])
    path = Path(run_dir) / "cache" / "eval" / f"{artifacts._sha(key.encode())}.parquet"
    if path.exists():
        return pq.read_table(path).to_pylist()
    gens = generate(model_dir, rows, cfg, seed, run_dir)
    table = pa.table({"sample_id": [r["sample_id"] for r in rows], "text": [g.text for g in gens],
                      "error": [g.error for g in gens]})
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_parquet_atomic(path, table, {"model": str(model_dir)})
    return table.to_pylist()


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    e, j = cfg.eval, cfg.judge
    check(cfg, run_dir)
    pairwise = [o for o in e.objectives if OBJECTIVES[o].pairwise]
    pointwise = [o for o in e.objectives if not OBJECTIVES[o].pairwise]
    toy = j.engine == "oracle"
    policy = artifacts.stage_dir(run_dir, "policy", iteration)
    inputs, baselines, world = _inputs(run_dir, cfg, iteration, bool(pairwise))
    stage = artifacts.Stage.of(run_dir, "eval", cfg, SECTIONS, iteration=iteration, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        rows = eval_samples(run_dir, cfg)
        risk = at_risk_set(world, e.at_risk_prompts) if toy else []
        seed = derive_seed(cfg.run.seed, "eval")
        steps = 1 + len(baselines) + bool(pairwise or pointwise) + bool(e.tasks)
        with progress_bar(f"eval iter {iteration}", total=steps, unit="steps", enabled=show_progress) as bar:
            gens, risk_gens = generate_sets(policy, [rows, risk], cfg, seed, run_dir)
            bar.advance(1)
            base_texts = {}
            for entry, folder in baselines:
                base_texts[entry] = cached_generations(run_dir, folder, rows, cfg, seed)
                bar.advance(1)
            judged = _judge(run_dir, cfg, rows, gens, base_texts, pairwise, pointwise, seed) \
                if (pairwise or pointwise) else ({}, {}, {"judge_calls": 0}, {})
            _check_judged(judged[2], cfg, iteration, run_dir)
            if pairwise or pointwise:
                bar.advance(1)
            benchmarks = run_lm_eval(policy, cfg) if e.tasks else {}
        oracle = None
        if toy:
            from sipt.oracle import OracleJudge

            oracle = OracleJudge(world / "kb.json")
        gen_table, ver_table = _tables(rows, gens, base_texts, *judged[:2], ground_truth(oracle, rows, gens))
        risk_table = _at_risk_table(oracle, risk, risk_gens)
        stage.write_part(0, gen_table, family="generations")
        stage.write_part(0, ver_table, family="versus")
        stage.write_part(0, risk_table, family="at_risk")
        summary = summarize(gen_table, ver_table, [b for b, _ in baselines], judged[2], benchmarks,
                            risk_table, judged[3])
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        return stage.commit(summary, rows=len(rows), errors=sum(bool(g.error) for g in gens))


def _inputs(run_dir: Path, cfg: Config, iteration: int, pairwise: bool) -> tuple[dict, list, Path | None]:
    """The stage's inputs, the baselines as (entry, model folder), and the oracle's world folder."""
    e, j = cfg.eval, cfg.judge
    inputs = {"samples": "samples", "policy": artifacts.stage_ref("policy", iteration)}
    baselines = []
    for entry in (e.baselines if pairwise else []):
        folder, ref = resolve_baseline(run_dir, entry, iteration)
        baselines.append((entry, folder))
        inputs[f"baseline:{entry}"] = ref
    world = None
    if j.engine == "oracle":
        inputs.update(oracle_inputs(j.world, run_dir, "judge", "judge.world"))
        world = oracle_kb(j.world, run_dir, "judge", "judge.world").parent
        held_out = world / "corpus" / "eval.jsonl"
        if e.at_risk_prompts and held_out.exists():
            inputs["at_risk"] = artifacts.files_ref([held_out])
    include = [str(Path(p).resolve()) for p in e.include_path]
    if include:
        inputs["lm_eval_tasks"] = artifacts.files_ref(include)
    return inputs, baselines, world


def _check_judged(judge_stats: dict, cfg: Config, iteration: int, run_dir: Path) -> None:
    """Stop before writing when the judge looks position-bound (and that is an error) or when too
    many of its calls gave no readable verdict."""
    e = cfg.eval
    if "judge_warning" in judge_stats and cfg.judge.fail_on_inconsistent:
        raise SiptError(f"eval iter {iteration}: {judge_stats['judge_warning']}. (judge.fail_on_inconsistent "
                        "= true; the judge calls and baseline generations are cached for a rerun)")
    calls, invalid = judge_stats["judge_calls"], judge_stats.get("judge_invalid", 0)
    if calls and invalid / calls > e.max_invalid_share:
        raise SiptError(
            f"eval iter {iteration}: {invalid} of {calls} judge calls ({invalid / calls:.1%}) gave no "
            f"readable verdict, more than eval.max_invalid_share = {e.max_invalid_share:.0%}; win rates "
            "over the rest would hide it. Check judge.model, judge.mode and the templates (the raw "
            f"responses are in {run_dir / 'cache' / 'judge.sqlite'}), or raise eval.max_invalid_share")


# The judging half and the toy world's counting, under the names this module had (tests use them).
_judge = evaluation.judge_generations
_tables = evaluation.tables
summarize = evaluation.summarize
intervals = evaluation.intervals
ground_truth = oracle_metrics.ground_truth
_at_risk_table = oracle_metrics.at_risk_table


def run_lm_eval(model_dir: Path, cfg: Config) -> dict:
    """{task: {"acc": .., "acc_norm": ..}} from lm_eval.simple_evaluate on the policy folder."""
    import logging

    import torch

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SiptError("eval.tasks needs lm-eval: pip install 'sipt[eval]' (or lm-eval)") from None
    e = cfg.eval
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=[str(Path(p).resolve()) for p in e.include_path] or None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float32" if device == "cpu" else "bfloat16"
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={Path(model_dir).resolve()},dtype={dtype}", tasks=list(e.tasks),
            task_manager=manager, limit=e.lm_eval_limit or None, device=device,
            batch_size=e.lm_eval_batch_size, bootstrap_iters=0, log_samples=False,
        )
    except KeyError as err:
        raise SiptError(f"eval.tasks: lm-eval does not know task {err}; built-in tasks need the hub, "
                        "local ones need eval.include_path") from None
    out = {}
    for task, metrics in results["results"].items():
        vals = {}
        for name in ("acc", "acc_norm", "exact_match"):
            v = metrics.get(f"{name},none")
            if isinstance(v, (int, float)) and not math.isnan(v):
                vals[name] = round(float(v), 4)
        out[task] = vals
    return out
