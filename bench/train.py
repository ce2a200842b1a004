"""bench/train: training throughput of `sipt train` against TRL's DPOTrainer and a plain PyTorch loop.

One run, one table, every column measured side by side: the tiny policy, the same pairs (the same
token ids: TRL gets them through the README's recipe), batch size, precision (fp32 on CPU, bf16
autocast on GPU) and number of steps.
  DPO: `sipt train` (reference log-probabilities computed once and stored; none for rollouts, whose
       log-probabilities the rollout stage recorded) vs TRL `DPOTrainer` with
       `precompute_ref_log_probs=True` and no gradient checkpointing (its fastest honest setting,
       the anchor: target sipt >= 2 x, moonshot 3 x) and TRL's defaults (a reference forward pass
       every step, gradient checkpointing).
  NTP: `sipt train --objective ntp` vs a plain PyTorch loop (AdamW, the same batches in the same
       order, the same autocast). Target >= 1.0 x. And `sipt train --objective ntp` with
       train.group_by_length = 50 (batches of like lengths, less padding) against it without.
Each run of a column is its own process; columns take turns, `--repeats` times (median, min, max).
Timed: sipt's training loop plus its reference pass; TRL's reference precompute plus its training
loop (train begin to train end); the plain loop's steps. Not timed, for all: loading models,
tokenizing, building the optimizer, saving. tokens/s counts the
prompt + continuation tokens of every sequence trained on (DPO: chosen and rejected); peak memory
is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"full": (128, 16), "quick": (16, 4)}  # pairs, batch


def prepare(work: Path, pairs: int, batch: int) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from shard import prepare_run

    from stages import rollout

    run, cfg = prepare_run(work, {
        "data.suffix_tokens": 64, "data.max_prefix_tokens": 128, "run.prompts_per_iter": pairs,
        "rollout.prompts_per_part": pairs, "rollout.n": 2, "train.batch_size": batch,
        "train.micro_batch_size": batch, "train.lr": 1e-5, "train.warmup_steps": 0, "train.checkpoint_every": 0,
    })
    rollout.run(run, cfg, 0, show_progress=False)
    write_pairs(run, "suffix-vs-rollout")
    return run


def write_pairs(run: Path, variant: str) -> None:
    """The pairs every column trains on: the suffix against a rollout, or two rollouts (the paper's
    main setting, where candidates are rollouts only)."""
    import pyarrow as pa

    from sipt import artifacts

    samples = {r["sample_id"]: r for r in artifacts.read_table(run / "samples").to_pylist()}
    rolls = {(r["sample_id"], r["rollout_idx"]): r for r in artifacts.read_table(run / "iter-000" / "rollout").to_pylist()}
    rows = []
    for sid in sorted({k[0] for k in rolls}):
        s, r0, r1 = samples[sid], rolls[(sid, 0)], rolls[(sid, 1)]
        chosen = ("suffix", -1, s["suffix_text"], s["suffix_ids"]) if variant == "suffix-vs-rollout" else \
            ("rollout", 0, r0["text"], r0["token_ids"])
        rejected = ("rollout", 0, r0["text"], r0["token_ids"]) if variant == "suffix-vs-rollout" else \
            ("rollout", 1, r1["text"], r1["token_ids"])
        rows.append({"sample_id": sid, "prompt": s["prefix_text"], "chosen": chosen[2], "rejected": rejected[2],
                     "prefix_ids": s["prefix_ids"], "prefix_start": s["prefix_start"], "chosen_ids": chosen[3],
                     "rejected_ids": rejected[3], "chosen_source": chosen[0], "rejected_source": rejected[0],
                     "chosen_rollout_idx": chosen[1], "rejected_rollout_idx": rejected[1]})
    stage = artifacts.Stage(run_dir=run, name="pair", out=run / "iter-000" / "pair", config_hash="bench",
                            config_sections=[], inputs={}, iteration=0, force=True)
    with stage:
        stage.write_part(0, pa.Table.from_pylist(rows))
        stage.commit()


def _tokens(rows: list[dict], bos: int | None, dpo: bool) -> int:
    """Tokens of one epoch over `rows`: DPO prompt+chosen and prompt+rejected; NTP the document."""
    from sipt.samples import policy_prompt

    total = 0
    for r in rows:
        prompt = len(policy_prompt(r["prefix_ids"], r["prefix_start"], bos, 1 << 30)[0])
        total += prompt * (2 if dpo else 1) + len(r["chosen_ids"]) + (len(r["rejected_ids"]) if dpo else 0)
    return total


def worker(kind: str, run: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sipt import config as config_mod
    from sipt.samples import policy_prompt, tokenizer_bos
    from stages import train

    kind, _, variant = kind.partition(":")
    grouped = variant == "grouped"  # sipt-ntp with train.group_by_length = 50 (the pairs are not used)
    write_pairs(run, "suffix-vs-rollout" if grouped or not variant else variant)
    policy = run / "iter-000" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    bos = tokenizer_bos(tok)
    cuda = torch.cuda.is_available()
    if kind in ("sipt-dpo", "sipt-ntp"):
        objective = kind.split("-")[1]
        cfg = config_mod.resolve(run, overrides={"train.objective": objective,
                                                 "train.group_by_length": 50 if grouped else 0}, force=True)
        rows = train.load_examples(run, cfg, 0)
        m = train.run(run, cfg, 0, force=True, show_progress=False)
        # the reference pass is part of DPO's cost (TRL's precompute is timed too); loading and saving are not
        seconds = m["stats"]["loop_seconds"] + m["stats"]["ref_seconds"]
        return {"seconds": seconds, "tokens": _tokens(rows, bos, objective == "dpo"), "steps": m["stats"]["steps"]}
    from transformers import AutoModelForCausalLM

    if kind in ("trl-dpo", "trl-dpo-precompute"):
        import datasets
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        cfg = config_mod.resolve(run, overrides={"train.objective": "dpo"}, force=True)
        batch_size = cfg.train.batch_size
        rows = train.load_examples(run, cfg, 0)
        spent = {"ref": 0.0}

        class IdsDPOTrainer(DPOTrainer):
            """The README's recipe (the same token ids as sipt), with TRL's reference precompute timed."""

            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset

            def _precompute_ref_logps(self, *args, **kwargs):
                t0 = time.perf_counter()
                out = super()._precompute_ref_logps(*args, **kwargs)
                spent["ref"] += time.perf_counter() - t0
                return out

        ds = datasets.Dataset.from_list([
            {"prompt_ids": policy_prompt(r["prefix_ids"], r["prefix_start"], bos, 1 << 30)[0],
             "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
        fast = kind == "trl-dpo-precompute"
        model = AutoModelForCausalLM.from_pretrained(policy)
        steps = math.ceil(len(rows) / batch_size)
        args = DPOConfig(output_dir=str(run / "trl"), per_device_train_batch_size=batch_size, max_steps=steps,
                         learning_rate=1e-5, beta=0.1, report_to=[], use_cpu=not cuda, bf16=cuda,
                         logging_steps=1000, save_strategy="no", lr_scheduler_type="constant", warmup_steps=0,
                         max_length=None, disable_tqdm=True, dataloader_num_workers=0,
                         precompute_ref_log_probs=fast, **({"gradient_checkpointing": False} if fast else {}))
        trainer = IdsDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)

        class Clock(TrainerCallback):
            """From the first step to the last, as sipt's loop_seconds (no optimizer or wrapper set-up)."""

            def on_train_begin(self, *args, **kwargs):
                spent["begin"] = time.perf_counter()

            def on_train_end(self, *args, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                spent["end"] = time.perf_counter()

        trainer.add_callback(Clock())
        trainer.train()
        seconds = spent["end"] - spent["begin"] + spent["ref"]
        return {"seconds": seconds, "tokens": _tokens(rows, bos, True), "steps": steps}
    # plain PyTorch NTP loop: sipt's NTP examples, batches and order, a full forward, AdamW
    import random
    from contextlib import nullcontext

    from sipt.losses import nll_loss
    from sipt.samples import derive_seed

    cfg = config_mod.resolve(run, overrides={"train.objective": "ntp"}, force=True)
    batch_size = cfg.train.batch_size
    rows = train.load_examples(run, cfg, 0)
    order = list(range(len(rows)))
    random.Random(derive_seed(cfg.run.seed, "train", 0, 0)).shuffle(order)  # as sipt train orders epoch 0
    device = "cuda" if cuda else "cpu"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    steps = math.ceil(len(rows) / batch_size)
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = [rows[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        batch = train.build_batch(chunk, "chosen_ids", bos, pad, 1 << 30, device)
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
            loss = nll_loss(logits, batch["input_ids"], batch["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "tokens": _tokens(rows, bos, False), "steps": steps}


COLUMNS = [  # key, label, anchor it is compared with
    ("trl-dpo-precompute", "DPO, suffix vs rollout: TRL DPOTrainer, precompute_ref_log_probs", None),
    ("trl-dpo", "DPO, suffix vs rollout: TRL DPOTrainer (defaults)", None),
    ("sipt-dpo", "DPO, suffix vs rollout: sipt train", "trl-dpo-precompute"),
    ("trl-dpo-precompute:rollout-vs-rollout", "DPO, rollout vs rollout: TRL DPOTrainer, precompute_ref_log_probs", None),
    ("trl-dpo:rollout-vs-rollout", "DPO, rollout vs rollout: TRL DPOTrainer (defaults)", None),
    ("sipt-dpo:rollout-vs-rollout", "DPO, rollout vs rollout: sipt train", "trl-dpo-precompute:rollout-vs-rollout"),
    ("torch-ntp", "NTP: plain PyTorch loop", None),
    ("sipt-ntp", "NTP: sipt train --objective ntp", "torch-ntp"),
    ("sipt-ntp:grouped", "NTP: sipt train --objective ntp, train.group_by_length = 50", "sipt-ntp"),
]
TARGETS = {"sipt-dpo": 2.0, "sipt-dpo:rollout-vs-rollout": 2.0, "sipt-ntp": 1.0}
DEFAULTS = {"sipt-dpo": "trl-dpo", "sipt-dpo:rollout-vs-rollout": "trl-dpo:rollout-vs-rollout"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every column (median, min, max; default 3)")
    ap.add_argument("--quick", action="store_true", help=f"a smoke test: {SIZES['quick'][0]} pairs in batches "
                    f"of {SIZES['quick'][1]} instead of {SIZES['full'][0]} in batches of {SIZES['full'][1]}")
    ap.add_argument("--only", default="", help="comma-separated column keys to run (default: all)")
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, Path(args.run))
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    from _columns import run_column  # bench/, beside this script

    pairs, batch = SIZES["quick" if args.quick else "full"]
    columns = [c for c in COLUMNS if not args.only or c[0] in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sipt-bench-train-"))
    try:
        run = prepare(work, pairs, batch)
        runs: dict[str, list[dict]] = {key: [] for key, _, _ in columns}
        failed: set[str] = set()
        for rep in range(args.repeats):  # columns take turns, so drift on the machine hits all of them
            for key, label, _ in columns:
                if key in failed:
                    continue
                r = run_column(sys.executable, __file__, key, run,
                               {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}, label, rep, args.repeats)
                if r is None:
                    failed.add(key)
                else:
                    runs[key].append(r)
        precision = "bf16 autocast, GPU" if torch.cuda.is_available() else "fp32, CPU"
        steps = math.ceil(pairs / batch)
        table = Table(title=f"bench/train: tiny policy, {pairs} pairs, {steps} steps x {batch}, {precision}, "
                            f"median of {args.repeats} runs [min, max]")
        for col in ("what", "seconds", "tokens/s", "peak RSS MB", "vs anchor (target)", "vs TRL defaults"):
            table.add_column(col, justify="left" if col == "what" else "right")
        median = {k: statistics.median(r["tps"] for r in v) for k, v in runs.items() if v}
        for key, label, anchor in columns:
            rs = runs[key]
            if not rs:
                table.add_row(label, "-", "-", "-", "failed", "")
                continue
            secs, tps = [r["seconds"] for r in rs], [r["tps"] for r in rs]
            ratio = ""
            if anchor in median:
                ratio = f"{median[key] / median[anchor]:.2f} x" + (f" (>= {TARGETS[key]:g})" if key in TARGETS else "")
            vs_defaults = f"{median[key] / median[DEFAULTS[key]]:.2f} x" if DEFAULTS.get(key) in median else ""
            table.add_row(label, f"{statistics.median(secs):.2f} [{min(secs):.2f}, {max(secs):.2f}]",
                          f"{median[key]:,.0f} [{min(tps):,.0f}, {max(tps):,.0f}]",
                          f"{statistics.median(r['peak_rss_mb'] for r in rs):,.0f}", ratio, vs_defaults)
        Console(width=200).print(table)
        print("anchors: sipt DPO vs TRL with precompute_ref_log_probs=True (target >= 2 x, moonshot 3 x); sipt NTP vs "
              "the plain PyTorch loop (target >= 1.0 x); sipt NTP with train.group_by_length vs without (an option, no "
              "target: tokens/s counts the real tokens, so padding saved shows as speed). Ratios are of median "
              "tokens/s. Times exclude model loading, tokenizing and saving; DPO times include the reference pass (sipt: only for non-rollout candidates, "
              "the rollout stage's log-probabilities under the same policy are reused; TRL: its precompute, or a "
              "reference forward in every step with the defaults).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
