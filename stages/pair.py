"""pair: turn an iteration's judge scores into training pairs (paper §7).

dpo: chosen = the candidate with the highest reward, rejected = the lowest (online DPO); rf-nll: the
highest only (reward-filtered NLL). A prefix with fewer than two scored candidates, or whose best
and worst rewards are equal (within `pair.min_margin`), gives no pair and is counted; equal rewards
at the top or bottom are broken by a seeded coin. Rows carry TRL's `prompt, chosen, rejected` text
columns and the exact policy tokens the train stage uses (never re-tokenized), with EOS last exactly
where a candidate ended naturally (`*_truncated` false): see the README for the TRL recipe that
trains on the same tokens.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sipt import artifacts, judging
from sipt.config import Config
from sipt.errors import SiptError
from sipt.progress import progress_bar
from sipt.samples import derive_seed, iteration_samples

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt", pa.string()),  # the prefix text (TRL)
        ("chosen", pa.string()),  # TRL
        ("rejected", pa.string()),  # TRL; "" for rf-nll
        ("prefix_ids", pa.list_(pa.int32())),  # from samples: build the prompt with samples.policy_prompt
        ("prefix_start", pa.int32()),
        ("chosen_ids", pa.list_(pa.int32())),  # exact policy tokens of the chosen continuation
        ("rejected_ids", pa.list_(pa.int32())),  # empty for rf-nll
        # cut at the token limit (the ids do not end with EOS); false: it ended there and EOS is last
        ("chosen_truncated", pa.bool_()),
        ("rejected_truncated", pa.bool_()),  # null for rf-nll
        ("chosen_source", pa.string()),  # "suffix" | "rewrite" | "rollout"
        ("rejected_source", pa.string()),  # the same; "" for rf-nll
        ("chosen_rollout_idx", pa.int32()),  # -1 if not a rollout
        ("rejected_rollout_idx", pa.int32()),
        ("chosen_reward", pa.float32()),
        ("rejected_reward", pa.float32()),  # null for rf-nll
    ]
)
SECTIONS = ["run.seed", "run.prompts_per_iter", "pair"]
SOURCES = ("suffix", "rewrite", "rollout")


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    p = cfg.pair
    if p.min_margin < 0:
        raise SiptError("pair.min_margin must be >= 0")
    judge_dir = artifacts.stage_dir(run_dir, "judge", iteration)
    stage = artifacts.Stage.of(run_dir, "pair", cfg, SECTIONS, iteration=iteration, force=force,
                               inputs={"samples": "samples", "judge": artifacts.stage_ref("judge", iteration)})
    with stage:
        if stage.skipped:
            return stage.manifest
        samples, _ = iteration_samples(run_dir, iteration, cfg.run.prompts_per_iter,
                                       columns=["sample_id", "prefix_text", "prefix_ids", "prefix_start"])
        prefixes = {r["sample_id"]: r for r in samples.to_pylist()}
        parts = artifacts.list_parts(judge_dir, "scores-")
        if not parts:
            raise SiptError(f"{judge_dir}: no scores-*.parquet; run `sipt judge` for iteration {iteration} first")
        totals = defaultdict(float)
        by_source = defaultdict(list)
        with progress_bar(f"pair iter {iteration}", total=len(parts), unit="parts", enabled=show_progress) as bar:
            for k, path in enumerate(parts):
                try:
                    scores = pq.read_table(path)
                except pa.ArrowInvalid as e:
                    raise SiptError(f"{path}: cannot read Parquet ({e}); rerun `sipt judge --force`") from None
                if "truncated" not in scores.column_names:
                    raise SiptError(f"{path}: no 'truncated' column (written by an older sipt judge); "
                                    "rerun `sipt judge --force`")
                scores = scores.to_pylist()
                for row in scores:
                    if row["reward"] is not None:
                        by_source[row["source"]].append(row["reward"])
                table, stats = _pairs(scores, prefixes, p.method, p.min_margin,
                                      derive_seed(cfg.run.seed, "pair", iteration, k), path)
                for key, v in stats.items():
                    totals[key] += v
                if not stage.has_part(k):
                    stage.write_part(k, table, stats)
                bar.advance(1)
        pairs = int(totals["pairs"])
        stats = {
            "method": p.method,
            "prefixes": int(totals["prefixes"]),
            "pairs": pairs,
            "skipped_ties": int(totals["skipped_ties"]),
            "skipped_too_few": int(totals["skipped_too_few"]),
            "rollout_chosen_rate": round(totals["chosen_rollout"] / pairs, 4) if pairs else None,
            "chosen_by_source": {s: int(totals[f"chosen_{s}"]) for s in SOURCES},
            "rejected_by_source": {s: int(totals[f"rejected_{s}"]) for s in SOURCES} if p.method == "dpo" else {},
            "mean_reward_by_source": {s: round(sum(v) / len(v), 4) for s, v in sorted(by_source.items())},
            "mean_margin": round(totals["margin"] / pairs, 4) if pairs and p.method == "dpo" else None,
        }
        return stage.commit(stats)


def _pairs(scores: list[dict], prefixes: dict, method: str, min_margin: float, seed: int, where: Path):
    cols = {name: [] for name in SCHEMA.names}
    stats = defaultdict(float)
    groups: dict[str, list[dict]] = {}
    for row in scores:
        groups.setdefault(row["sample_id"], []).append(row)
    for sid, cands in groups.items():
        if sid not in prefixes:
            raise SiptError(f"{where}: sample {sid} is not in this iteration's samples; rerun `sipt judge --force`")
        stats["prefixes"] += 1
        rng = random.Random(derive_seed(seed, sid))
        chosen, rejected, why = judging.select_pair([c["reward"] for c in cands], method, rng, min_margin)
        if why:
            stats["skipped_ties" if why == "tie" else "skipped_too_few"] += 1
            continue
        c = cands[chosen]
        r = cands[rejected] if rejected is not None else None
        pre = prefixes[sid]
        cols["sample_id"].append(sid)
        cols["prompt"].append(pre["prefix_text"])
        cols["chosen"].append(c["text"])
        cols["rejected"].append(r["text"] if r else "")
        cols["prefix_ids"].append(pre["prefix_ids"])
        cols["prefix_start"].append(pre["prefix_start"])
        cols["chosen_ids"].append(c["token_ids"])
        cols["rejected_ids"].append(r["token_ids"] if r else [])
        cols["chosen_truncated"].append(c["truncated"])
        cols["rejected_truncated"].append(r["truncated"] if r else None)
        cols["chosen_source"].append(c["source"])
        cols["rejected_source"].append(r["source"] if r else "")
        cols["chosen_rollout_idx"].append(c["rollout_idx"])
        cols["rejected_rollout_idx"].append(r["rollout_idx"] if r else -1)
        cols["chosen_reward"].append(c["reward"])
        cols["rejected_reward"].append(r["reward"] if r else None)
        stats["pairs"] += 1
        stats[f"chosen_{c['source']}"] += 1
        if r:
            stats[f"rejected_{r['source']}"] += 1
            stats["margin"] += c["reward"] - r["reward"]
    stats.setdefault("skipped_ties", 0)
    stats.setdefault("skipped_too_few", 0)
    stats.setdefault("pairs", 0)
    return pa.table(cols, schema=SCHEMA), {k: (int(v) if float(v).is_integer() else v) for k, v in stats.items()}
