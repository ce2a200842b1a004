"""bench/train: training throughput of `sipt train` against TRL's DPOTrainer and a plain PyTorch loop.

One run, one table, on the tiny policy and the same pairs, batch size, precision (fp32 on CPU,
bf16 on GPU) and number of steps:
  DPO: `sipt train` (reference log-probabilities computed once and stored) vs TRL `DPOTrainer`
       (its defaults: a reference forward pass every step). Target: sipt >= 2 x TRL.
  NTP: `sipt train --objective ntp` vs a plain PyTorch loop (AdamW, same batches). Target >= 0.9 x.
Each column runs in its own process; tokens/s counts prompt + continuation tokens of every sequence
trained on (for DPO both chosen and rejected); model loading is excluded; peak memory is the
process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS, BATCH, STEPS = 128, 16, 8


def prepare(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from shard import prepare_run

    from stages import rollout

    run, cfg = prepare_run(work, {
        "data.suffix_tokens": 64, "data.max_prefix_tokens": 128, "run.prompts_per_iter": PAIRS,
        "rollout.prompts_per_part": PAIRS, "rollout.n": 2, "train.batch_size": BATCH,
        "train.micro_batch_size": BATCH, "train.lr": 1e-5, "train.warmup_steps": 0, "train.checkpoint_every": 0,
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


def _pairs(run: Path) -> list[dict]:
    from sipt import artifacts

    return artifacts.read_table(run / "iter-000" / "pair").to_pylist()


def _tokens(rows: list[dict], dpo: bool) -> int:
    """Tokens trained on in STEPS x BATCH rows: DPO prompt+chosen and prompt+rejected; NTP prefix+suffix."""
    per = [len(r["prefix_ids"]) * (2 if dpo else 1) + len(r["chosen_ids"]) + (len(r["rejected_ids"]) if dpo else 0)
           for r in rows]
    return sum(per[: BATCH * STEPS])


def worker(kind: str, run: Path) -> dict:
    import torch

    from sipt import config as config_mod

    kind, _, variant = kind.partition(":")
    write_pairs(run, variant or "suffix-vs-rollout")
    rows = _pairs(run)
    if kind in ("sipt-dpo", "sipt-ntp"):
        from stages import train

        objective = kind.split("-")[1]
        cfg = config_mod.resolve(run, overrides={"train.objective": objective}, force=True)
        m = train.run(run, cfg, 0, force=True, show_progress=False)
        # the reference pass is part of DPO's cost (TRL does it inside its steps); loading and saving are not
        seconds = m["stats"]["loop_seconds"] + m["stats"]["ref_seconds"]
        return {"seconds": seconds, "tokens": _tokens(rows, objective == "dpo"), "steps": m["stats"]["steps"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = run / "iter-000" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    if kind == "trl-dpo":
        import datasets
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(policy)
        ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                         for r in rows])
        args = DPOConfig(output_dir=str(run / "trl"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                         learning_rate=1e-5, beta=0.1, report_to=[], use_cpu=not torch.cuda.is_available(),
                         bf16=torch.cuda.is_available(), logging_steps=1000, save_strategy="no",
                         lr_scheduler_type="constant", max_length=None, disable_tqdm=True,
                         dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        return {"seconds": time.perf_counter() - t0, "tokens": _tokens(rows, True), "steps": STEPS}
    # plain PyTorch NTP loop on the same documents (prefix + suffix, loss on every token)
    from sipt.losses import nll_loss
    from stages.train import build_batch

    rows = [{"prefix_ids": [], "prefix_start": 1, "chosen_ids": r["prefix_ids"] + r["chosen_ids"]} for r in rows]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(policy).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t0 = time.perf_counter()
    for step in range(STEPS):
        batch = build_batch(rows[step * BATCH : (step + 1) * BATCH], "chosen_ids", None, tok.pad_token_id, 4096, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        loss = nll_loss(logits, batch["input_ids"], batch["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - t0, "tokens": _tokens(rows, False), "steps": STEPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, Path(args.run))
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(res))
        return

    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="sipt-bench-train-"))
    try:
        run = prepare(work)
        columns = [("trl-dpo", "DPO, suffix vs rollout: TRL DPOTrainer (defaults)"),
                   ("sipt-dpo", "DPO, suffix vs rollout: sipt train"),
                   ("trl-dpo:rollout-vs-rollout", "DPO, rollout vs rollout: TRL DPOTrainer (defaults)"),
                   ("sipt-dpo:rollout-vs-rollout", "DPO, rollout vs rollout: sipt train"),
                   ("torch-ntp", "NTP: plain PyTorch loop"), ("sipt-ntp", "NTP: sipt train --objective ntp")]
        results = {}
        for key, label in columns:
            proc = subprocess.run([sys.executable, __file__, "--worker", key, "--run", str(run)],
                                  capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed\n{proc.stderr[-3000:]}")
                continue
            results[key] = json.loads(line[7:])
        table = Table(title=f"bench/train: tiny policy, {STEPS} steps x {BATCH} pairs, fp32 CPU")
        for col in ("what", "steps", "seconds", "tokens/s", "peak RSS MB", "ratio"):
            table.add_column(col, justify="left" if col == "what" else "right")
        base = {"sipt-dpo": "trl-dpo", "sipt-ntp": "torch-ntp",
                "sipt-dpo:rollout-vs-rollout": "trl-dpo:rollout-vs-rollout"}
        for key, label in columns:
            r = results.get(key)
            if not r:
                table.add_row(label, "-", "-", "-", "-", "failed")
                continue
            tps = r["tokens"] / r["seconds"]
            ratio = ""
            if key in base and base[key] in results:
                b = results[base[key]]
                ratio = f"{tps / (b['tokens'] / b['seconds']):.2f} x"
            table.add_row(label, str(r["steps"]), f"{r['seconds']:.1f}", f"{tps:,.0f}", f"{r['peak_rss_mb']:,.0f}", ratio)
        Console().print(table)
        print("targets: sipt DPO >= 2 x TRL; sipt NTP >= 0.9 x plain PyTorch. Times exclude model loading and "
              "saving; sipt's DPO time includes its reference pass (none for rollout candidates: the rollout "
              "stage's log-probabilities under the same policy are reused).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
