"""Which unsafe openings does SIPT learn to leave safely, and where does DPO put its margin? Two tables.

Reads a toy-world demo folder (`make loop`: RUN/world, RUN/sipt, RUN/ntp, each evaluated), the
at-risk set of `sipt eval` (held-out prefixes cut 1-3 words into an unsafe sentence) and the SIPT
run's training pairs.

Table 1, per unsafe template of the world's language: its at-risk prefixes; the training prompts cut
inside one of its sentences (the prompt's unfinished last sentence, finished by the chosen or the
rejected text, is the template's unsafe sentence or its safe twin), and of those the pairs that chose
the safe twin over the unsafe sentence ("taught"); how often the whole unsafe sentence stands
anywhere in a rejected and in a chosen text (a rollout that wrote it of its own accord: DPO pushes
its words down there too); then, for the warm start, SIPT and NTP at the
last iteration: greedy continuations judged unsafe by the oracle (k/n) and the mean log-odds of
finishing the begun sentence unsafely rather than as its safe twin (the policy's log-probability of
the rest of the unsafe sentence minus that of the rest of the twin, in nats; > 0 favours unsafe).

Table 2, the taught pairs: how much SIPT's final policy changed (against the warm start) the
log-probability of the chosen and of the rejected text at their first differing token (the word
that makes the sentence safe or unsafe: " visit" / " burn") and over the whole 32-token texts. DPO's
loss sees only the whole-text margin; greedy decoding at an at-risk prefix sees the first one.

Run: python bench/at_risk_openings.py [--run runs/demo] [--iter 8]
     python bench/at_risk_openings.py --run runs/safety --sipt runs/safety/pools/suffix \
         --ntp runs/safety/pools/ntp --warm runs/safety/check   (a run whose iteration 0 evaluated the warm start)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sipt import artifacts  # noqa: E402
from sipt.oracle import OracleJudge  # noqa: E402
from sipt.samples import policy_prompt, tokenizer_bos  # noqa: E402


def pattern(template: str) -> re.Pattern:
    """A realised sentence of `template` ({S} subject, {P} possessive), with the fillers as groups."""
    s = re.escape(template).replace(r"\{S\}", "(?P<S>.+?)").replace(r"\{P\}", "(?P<P>.+?)")
    return re.compile("^" + s + "$")


def fill(template: str, groups: dict) -> str:
    return template.replace("{S}", groups.get("S") or "").replace("{P}", groups.get("P") or "")


def cut_sentence(prompt: str, text: str) -> str | None:
    """The sentence a prompt cut inside, finished by `text`; None when the prompt ends a sentence."""
    if not prompt or prompt.rstrip().endswith((".", "!", "?")):
        return None
    partial = re.split(r"(?<=[.!?])\s+", prompt)[-1]
    joined = partial + text
    end = joined.find(".", len(partial))
    return joined[: end + 1].strip() if end >= 0 else None


def last_iteration(run: Path) -> int:
    done = artifacts.finished(run, "eval")
    if not done:
        sys.exit(f"{run}: no evaluated iteration; run `make loop` first")
    return max(done)


def read_at_risk(run: Path, iteration: int) -> list[dict]:
    folder = artifacts.stage_dir(run, "eval", iteration)
    if not list(folder.glob("at_risk-*.parquet")):
        sys.exit(f"{folder}: no at-risk table (eval.at_risk_prompts = 0, or not a toy-world run)")
    return artifacts.read_table(folder, prefix="at_risk-").to_pylist()


class Scorer:
    """A policy's log-probabilities of continuations, its prompts built as the policy sees them in eval
    and training (`sipt.samples.policy_prompt`: BOS where the tokenizer uses one, left-truncated)."""

    def __init__(self, policy: Path):
        self.tok = AutoTokenizer.from_pretrained(policy)
        self.model = AutoModelForCausalLM.from_pretrained(policy).eval()
        self.bos = tokenizer_bos(self.tok)

    def prompt(self, prefix_ids: list[int], prefix_start: int, continuation: int) -> list[int]:
        return policy_prompt(prefix_ids, prefix_start, self.bos, self.model.config.max_position_embeddings - continuation)[0]

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i >= 1."""
        logits = self.model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return logits.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)

    def rest(self, prefix: str, rest: str) -> float:
        """log p(rest | prefix), the prefix a document's start; where joining them re-tokenises the
        prefix's end, scored from the first token that differs."""
        a = self.tok(prefix, add_special_tokens=False).input_ids
        b = self.tok(prefix + rest, add_special_tokens=False).input_ids
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        tail = b[n:]
        return float(self.token_logprobs(self.prompt(b[:n], 0, len(tail)) + tail)[-len(tail):].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo folder (world, sipt, ntp)")
    ap.add_argument("--sipt", type=Path, default=None, help="the SIPT run (default: RUN/sipt)")
    ap.add_argument("--ntp", type=Path, default=None, help="the NTP run (default: RUN/ntp)")
    ap.add_argument("--warm", type=Path, default=None,
                    help="the run whose iteration 0 (policy and eval) is the warm start (default: the SIPT run)")
    ap.add_argument("--iter", type=int, default=None, help="SIPT's and NTP's iteration (default: SIPT's last evaluated)")
    args = ap.parse_args()
    run = args.run
    sipt_run, ntp_run = args.sipt or run / "sipt", args.ntp or run / "ntp"
    warm_run = args.warm or sipt_run
    last = args.iter if args.iter is not None else last_iteration(sipt_run)
    language = json.loads((run / "world" / "kb.json").read_text())["language"]
    templates = [(u, pattern(u["text"]), pattern(u["safe"])) for u in language["unsafe"]]
    oracle = OracleJudge(run / "world" / "kb.json")

    docs = {}
    for line in (run / "world" / "corpus" / "eval.jsonl").open():
        if line.strip():
            d = json.loads(line)
            docs[str(d.get("doc_id", d.get("id", "")))] = d

    policies = {"warm start": (warm_run, 0), "SIPT": (sipt_run, last), "NTP": (ntp_run, last)}
    risk = {name: read_at_risk(r, i) for name, (r, i) in policies.items()}
    rows = risk["SIPT"]
    for name, table in risk.items():
        if [(r["doc_id"], r["sentence"], r["cut"]) for r in table] != [(r["doc_id"], r["sentence"], r["cut"]) for r in rows]:
            sys.exit(f"the {name} at-risk set differs from SIPT's: evaluate them on the same world")

    # each at-risk prefix: its template, the rest of the unsafe sentence and of its safe twin
    info = []
    for r in rows:
        sentence = docs[r["doc_id"]]["sentences"][r["sentence"]]
        for j, (u, unsafe_rx, _) in enumerate(templates):
            m = unsafe_rx.match(sentence)
            if m:
                safe = fill(u["safe"], m.groupdict())
                k = r["cut"]
                info.append((j, " " + " ".join(sentence.split()[k:]), " " + " ".join(safe.split()[k:])))
                break
        else:
            sys.exit(f"at-risk sentence matches no unsafe template: {sentence!r}")

    scorers = {name: Scorer(artifacts.stage_dir(r, "policy", i)) for name, (r, i) in policies.items()}
    log_odds = {name: [s.rest(r["prefix_text"], u) - s.rest(r["prefix_text"], t) for r, (_, u, t) in zip(rows, info)]
                for name, s in scorers.items()}

    # the training pairs cut inside a template's sentence
    cut_in, taught = defaultdict(int), defaultdict(list)
    said = {"rejected": defaultdict(int), "chosen": defaultdict(int)}
    for i in range(last):
        folder = artifacts.stage_dir(sipt_run, "pair", i)
        for p in artifacts.read_table(folder).to_pylist():
            for side in ("rejected", "chosen"):  # the whole unsafe sentence, said anywhere in the text
                sentences = [t.strip() for t in re.split(r"(?<=[.!?])\s+", p[side])]
                for j, (_, unsafe_rx, _) in enumerate(templates):
                    said[side][j] += sum(1 for t in sentences[1:] if unsafe_rx.match(t))
                    said[side][j] += bool(sentences and p["prompt"].rstrip().endswith((".", "!", "?"))
                                          and unsafe_rx.match(sentences[0]))
            chosen_s, rejected_s = cut_sentence(p["prompt"], p["chosen"]), cut_sentence(p["prompt"], p["rejected"])
            for j, (u, unsafe_rx, safe_rx) in enumerate(templates):
                if any(s and (unsafe_rx.match(s) or safe_rx.match(s)) for s in (chosen_s, rejected_s)):
                    cut_in[j] += 1
                    if rejected_s and unsafe_rx.match(rejected_s) and oracle.safety(p["prompt"], p["chosen"]):
                        taught[j].append(p)
                    break

    names = list(policies)
    print(f"# At-risk openings: {sipt_run} against {ntp_run} (iteration {last}; {len(rows)} at-risk prefixes, "
          f"{sum(cut_in.values())} training prompts cut inside an unsafe sentence or its twin, "
          f"iterations 0-{last - 1})\n")
    print("| unsafe sentence | at-risk prefixes | training prompts cut inside it (taught) | said whole in rejected / chosen texts | "
          + " | ".join(f"{n}: unsafe, log-odds" for n in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for j, (u, _, _) in enumerate(templates):
        idx = [i for i, (jj, _, _) in enumerate(info) if jj == j]
        if not idx and not cut_in[j]:
            continue
        cells = []
        for n in names:
            unsafe = sum(1 for i in idx if risk[n][i]["safe"] is False)
            mean = sum(log_odds[n][i] for i in idx) / len(idx) if idx else float("nan")
            cells.append(f"{unsafe}/{len(idx)}, {mean:+.2f}")
        print(f"| {u['text']} | {len(idx)} | {cut_in[j]} ({len(taught[j])}) | {said['rejected'][j]} / {said['chosen'][j]} | "
              + " | ".join(cells) + " |")
    cells = []
    for n in names:
        unsafe = sum(1 for r in risk[n] if r["safe"] is False)
        cells.append(f"{unsafe}/{len(rows)}, {sum(log_odds[n]) / len(rows):+.2f}")
    print(f"| all | {len(rows)} | {sum(cut_in.values())} ({sum(len(v) for v in taught.values())}) | "
          f"{sum(said['rejected'].values())} / {sum(said['chosen'].values())} | " + " | ".join(cells) + " |")

    # where DPO put the margin on the taught pairs
    warm, final = scorers["warm start"], scorers["SIPT"]
    print(f"\n# Taught pairs: SIPT iteration {last} minus the warm start, log-probability (nats), mean per pair\n")
    print("| unsafe sentence | taught pairs | chosen, first differing token | rejected, first differing token "
          "| chosen, whole text | rejected, whole text |")
    print("|---|---|---|---|---|---|")
    total = [0.0] * 4
    count = 0
    for j, (u, _, _) in enumerate(templates):
        if not taught[j]:
            continue
        sums, n = [0.0] * 4, 0
        for p in taught[j]:
            c, r = list(p["chosen_ids"]), list(p["rejected_ids"])
            d = next((i for i, (x, y) in enumerate(zip(c, r)) if x != y), min(len(c), len(r)))
            if d >= min(len(c), len(r)):  # one text starts the other: no differing token
                continue
            lp = {}
            for name, s in (("w", warm), ("f", final)):
                prompt = s.prompt(list(p["prefix_ids"]), p["prefix_start"], max(len(c), len(r)))
                lc, lr = s.token_logprobs(prompt + c), s.token_logprobs(prompt + r)
                k0 = len(prompt) - 1
                lp[name] = (float(lc[k0 + d]), float(lr[k0 + d]), float(lc[k0:].sum()), float(lr[k0:].sum()))
            for k in range(4):
                sums[k] += lp["f"][k] - lp["w"][k]
            n += 1
        if not n:
            continue
        total = [t + s for t, s in zip(total, sums)]
        count += n
        print(f"| {u['text']} | {n} | " + " | ".join(f"{s / n:+.2f}" for s in sums) + " |")
    if count:
        print(f"| all | {count} | " + " | ".join(f"{t / count:+.2f}" for t in total) + " |")


if __name__ == "__main__":
    main()
