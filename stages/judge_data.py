"""judge-data: a judge's training and validation sets from a run's samples (PAPER §6.5).

Quality: a corruptor (judge_data.engine: the toy world's oracle, or a model prompted with
data/prompts/corrupt.txt, the paper's Fig. 10) rewrites each original suffix so it resembles the
original but is worse; its answer is read strictly (`MODIFIED CONTINUATION: ...`), and an answer
without the marker, or one that returns the original unchanged, is dropped and counted. Each
(original, corrupted) pair gives two samples in the quality prompt, both orders; the label is the
original (1.0: Option 1 is the better one, 0.0: Option 2).
Safety: the [judge] section's engine labels each text with the safety prompt `judge_data.label_seeds`
times, one seed each; only unanimous texts are kept (label 1.0 = safe).
Rows are split into train and validation by sample (both orders of a pair stay on one side). Every
row is written, the dropped ones with `error` set; judge-train reads the rows with no error.
A corruptor or labeller that gives nothing usable, or too few unanimous safety texts, fails the
stage with the counts instead of writing an empty set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from sipt import artifacts
from sipt.config import Config, check_model
from sipt.corruptor import parse_corrupted
from sipt.engines import Sampling, make_engine
from sipt.errors import SiptError
from sipt.executor import run_parts
from sipt.kb import oracle_inputs, oracle_kb
from sipt.objectives import OBJECTIVES, load_template, render
from sipt.samples import derive_seed, read_samples

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("task", pa.string()),  # quality | safety
        ("split", pa.string()),  # train | validation
        ("prompt", pa.string()),  # the judge prompt (the objective's template, filled; no chat template)
        ("label", pa.float64()),  # quality: 1.0 = Option 1 is the original; safety: 1.0 = safe
        ("answer", pa.string()),  # the verdict the label stands for, as the judge writes it
        ("prefix", pa.string()),
        ("option_1", pa.string()),
        ("option_2", pa.string()),
        ("candidate", pa.string()),  # safety: the labelled text
        ("corrupted", pa.bool_()),  # the text (quality: the pair) comes from the corruptor
        ("votes", pa.list_(pa.float64())),  # safety: the labeller's verdicts (null: unreadable)
        ("response", pa.string()),  # quality: the corruptor's raw answer
        ("error", pa.string()),  # why the row is not used ("" when it is)
    ]
)
SECTIONS = ["run.seed", "data.suffix_tokens", "judge_data", "judge.engine", "judge.model", "judge.templates",
            "judge.chat", "judge.temperature", "judge.top_p", "judge.max_new_tokens", "judge.noise", "judge.world"]
PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts"


def load_corrupt_template(name: str) -> str:
    path = Path(name) if name.endswith(".txt") else PROMPTS / f"{name}.txt"
    if not path.exists():
        raise SiptError(f"judge_data.template = {name!r}: no such template ({path})")
    text = path.read_text()
    missing = [s for s in ("{prefix}", "{suffix}") if s not in text]
    if missing:
        raise SiptError(f"{path}: the corruption template lacks {', '.join(missing)}")
    return text


def answer_text(task: str, label: float) -> str:
    """The verdict a perfect judge writes for `label` (the objective's answer prefix and option)."""
    o = OBJECTIVES[task]
    option = next(text for text, value in o.options if value == label)
    return o.answer_prefix + option


def split_of(sample_id: str, seed: int, fraction: float) -> str:
    return "validation" if derive_seed(seed, "judge-data-split", sample_id) / 2**63 < fraction else "train"


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work."""
    jd = cfg.judge_data
    load_corrupt_template(jd.template)
    load_template("quality", cfg.judge.templates.get("quality", ""))
    load_template("safety", cfg.judge.templates.get("safety", ""))
    if jd.engine == "oracle":
        oracle_kb(jd.world, run_dir, "corruptor", "judge_data.world")
    else:
        check_model("judge_data", jd)
    if cfg.judge.engine == "oracle":
        oracle_kb(cfg.judge.world, run_dir, "safety labeller", "judge.world")
    else:
        check_model("judge", cfg.judge)
    if jd.label_seeds < 1:
        raise SiptError(f"judge_data.label_seeds = {jd.label_seeds}: at least 1")


def run(run_dir: Path, cfg: Config, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    jd = cfg.judge_data
    check(cfg, run_dir)
    inputs = {"samples": "samples"}
    if jd.engine == "oracle":
        inputs.update({f"corruptor_{k}": v for k, v in oracle_inputs(jd.world, run_dir, "corruptor",
                                                                      "judge_data.world").items()})
    if cfg.judge.engine == "oracle":
        inputs.update({f"labeller_{k}": v for k, v in oracle_inputs(cfg.judge.world, run_dir, "safety labeller",
                                                                     "judge.world").items()})
    stage = artifacts.Stage.of(run_dir, "judge-data", cfg, SECTIONS, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        samples = read_samples(run_dir, columns=["sample_id", "split", "prefix_text", "suffix_text"])
        samples = samples.filter(pc.equal(samples["split"], "train"))
        rows = samples.slice(0, jd.samples).to_pylist()
        if not rows:
            raise SiptError(f"{run_dir}/samples: no 'train' samples to build judge data from")
        parts = [rows[k:k + jd.samples_per_part] for k in range(0, len(rows), jd.samples_per_part)]
        kbs = {"corruptor": str(oracle_kb(jd.world, run_dir, "corruptor", "judge_data.world")) if jd.engine == "oracle" else "",
               "labeller": str(oracle_kb(cfg.judge.world, run_dir, "labeller", "judge.world"))
               if cfg.judge.engine == "oracle" else ""}
        job = JudgeDataJob(cfg, parts, kbs["corruptor"], kbs["labeller"])
        ran = run_parts(job, stage.tmp, cfg.run, label="judge-data", unit="samples", show_progress=show_progress)
        stats = {k: int(v) for k, v in stage.collected_stats().items()}
        _refuse_bad(stats, jd)
        stats.update(executor=ran["executor"], workers=ran["workers"])
        stats["safe_share"] = round(stats["safety_safe"] / max(1, stats["safety_unanimous"]), 4)
        return stage.commit(stats, errors=stats["quality_dropped"] + stats["safety_dropped"])


def _refuse_bad(s: dict, jd) -> None:
    """Garbage from the corruptor or the labeller, or too few usable rows: an error with the counts."""
    corr = (f"corruptions: requested {s['quality_requested']}, parsed {s['quality_parsed']}, dropped "
            f"{s['quality_dropped']} ({s['quality_unparseable']} without 'MODIFIED CONTINUATION:', "
            f"{s['quality_unchanged']} unchanged)")
    if s["quality_parsed"] < jd.min_quality:
        raise SiptError(f"judge-data: the corruptor gave too few usable answers (at least judge_data.min_quality = "
                        f"{jd.min_quality} needed); {corr}. Check judge_data.engine/model and the template "
                        f"'{jd.template}'")
    labels = (f"safety texts: requested {s['safety_requested']} x {jd.label_seeds} seeds = {s['label_calls']} "
              f"calls, {s['label_unreadable']} without a readable FINAL DECISION; unanimous {s['safety_unanimous']}, "
              f"dropped {s['safety_dropped']}")
    if s["label_calls"] and s["label_unreadable"] == s["label_calls"]:
        raise SiptError(f"judge-data: the safety labeller (judge.engine/model) gave no readable verdict; {labels}")
    if s["safety_unanimous"] < jd.min_safety:
        raise SiptError(f"judge-data: too few unanimous safety texts (at least judge_data.min_safety = "
                        f"{jd.min_safety} needed); {labels}. Lower judge_data.label_seeds or judge.temperature, or "
                        "raise judge_data.samples")


@dataclass
class JudgeDataJob:
    """Corrupt and label the samples of one part: built here, run by any executor (sipt/executor.py)."""

    cfg: Config
    parts: list
    corruptor_kb: str  # the oracle corruptor's knowledge base ("" for a model corruptor)
    labeller_kb: str  # the oracle labeller's ("" for a model labeller: the [judge] section)
    families = ("part",)

    def open(self) -> None:
        from sipt.oracle import OracleJudge

        self.corruptor = self.corrupt_engine = self.label_engine = None
        if self.corruptor_kb:
            from sipt.corruptor import OracleCorruptor

            self.corruptor = OracleCorruptor(OracleJudge(self.corruptor_kb))
        else:
            self.corrupt_engine = make_engine(self.cfg.judge_data)
            self.corrupt_template = load_corrupt_template(self.cfg.judge_data.template)
        if self.labeller_kb:
            self.oracle_labellers = [OracleJudge(self.labeller_kb, noise=self.cfg.judge.noise, seed=s)
                                     for s in self._label_seeds()]
        else:
            self.label_engine = make_engine(self.cfg.judge)
        self.templates = {t: load_template(t, self.cfg.judge.templates.get(t, "")) for t in ("quality", "safety")}

    def _label_seeds(self) -> list[int]:
        return [derive_seed(self.cfg.run.seed, "judge-data-label", j) for j in range(self.cfg.judge_data.label_seeds)]

    def weight(self, k: int) -> int:
        return len(self.parts[k])

    def part(self, k: int):
        part, cfg = self.parts[k], self.cfg
        seeds = [derive_seed(cfg.run.seed, "judge-data-corrupt", r["sample_id"]) for r in part]
        responses = self._corrupt(part, seeds)
        stats = dict.fromkeys(("quality_requested", "quality_parsed", "quality_dropped", "quality_unparseable",
                               "quality_unchanged", "quality_rows", "safety_requested", "safety_unanimous",
                               "safety_dropped", "safety_safe", "label_calls", "label_unreadable",
                               "train_rows", "validation_rows"), 0)
        out = []
        texts = []  # (row, text, corrupted) to label for safety
        for r, response in zip(part, responses):
            split = split_of(r["sample_id"], cfg.run.seed, cfg.judge_data.validation_fraction)
            original = r["suffix_text"]
            corrupted = parse_corrupted(response)
            stats["quality_requested"] += 1
            error = ("no 'MODIFIED CONTINUATION:' in the corruptor's answer" if corrupted is None
                     else "the corruption is the original unchanged" if corrupted.strip() == original.strip() else "")
            texts.append((r, split, original, False))
            if error:
                stats["quality_dropped"] += 1
                stats["quality_unparseable" if corrupted is None else "quality_unchanged"] += 1
                out.append(_row(r, "quality", split, error=error, response=response))
                continue
            stats["quality_parsed"] += 1
            if cfg.judge_data.label_corrupted:
                texts.append((r, split, corrupted, True))
            for first, second, label in ((original, corrupted, 1.0), (corrupted, original, 0.0)):
                prompt = render(self.templates["quality"], prefix=r["prefix_text"], option_1=first, option_2=second)
                out.append(_row(r, "quality", split, prompt=prompt, label=label, option_1=first, option_2=second,
                                corrupted=True, response=response))
                stats["quality_rows"] += 1
                stats[f"{split}_rows"] += 1
        votes = self._label(texts)
        for (r, split, text, corrupted), v in zip(texts, votes):
            stats["safety_requested"] += 1
            stats["label_calls"] += len(v)
            stats["label_unreadable"] += sum(x is None for x in v)
            unanimous = all(x is not None for x in v) and len(set(v)) == 1
            if not unanimous:
                stats["safety_dropped"] += 1
                why = "unreadable safety label" if any(x is None for x in v) else "safety labels not unanimous"
                out.append(_row(r, "safety", split, candidate=text, corrupted=corrupted, votes=v, error=why))
                continue
            prompt = render(self.templates["safety"], candidate=text)
            out.append(_row(r, "safety", split, prompt=prompt, label=v[0], candidate=text, corrupted=corrupted, votes=v))
            stats["safety_unanimous"] += 1
            stats["safety_safe"] += v[0] == 1.0
            stats[f"{split}_rows"] += 1
        cols = {name: [row[name] for row in out] for name in SCHEMA.names}
        return [("part", pa.table(cols, schema=SCHEMA), stats)]

    def _corrupt(self, part, seeds) -> list[str]:
        if self.corruptor is not None:
            return [self.corruptor.respond(r["prefix_text"], r["suffix_text"], s) for r, s in zip(part, seeds)]
        jd = self.cfg.judge_data
        prompts = [self.corrupt_template.replace("{prefix}", r["prefix_text"]).replace("{suffix}", r["suffix_text"])
                   for r in part]
        s = Sampling(n=1, temperature=jd.temperature, top_p=jd.top_p,
                     max_new_tokens=jd.max_new_tokens or 3 * self.cfg.data.suffix_tokens)
        gens = self.corrupt_engine.generate_many(prompts, seeds, s, chat=jd.chat)
        return [g[0].text if g and not g[0].error else "" for g in gens]

    def _label(self, texts) -> list[list[float | None]]:
        from sipt.objectives import parse_safety

        seeds = self._label_seeds()
        if self.label_engine is None:
            return [[parse_safety(j.respond("safety", r["prefix_text"], [text])) for j in self.oracle_labellers]
                    for r, _, text, _ in texts]
        jc = self.cfg.judge
        prompts = [render(self.templates["safety"], candidate=text) for _, _, text, _ in texts]
        flat_prompts = [p for p in prompts for _ in seeds]
        flat_seeds = [derive_seed(s, k) for k in range(len(prompts)) for s in seeds]
        s = Sampling(n=1, temperature=jc.temperature, top_p=jc.top_p, max_new_tokens=jc.max_new_tokens)
        gens = self.label_engine.generate_many(flat_prompts, flat_seeds, s, chat=jc.chat)
        verdicts = [parse_safety(g[0].text) if g and not g[0].error else None for g in gens]
        return [verdicts[k * len(seeds):(k + 1) * len(seeds)] for k in range(len(prompts))]

    def close(self) -> None:
        for name in ("corrupt_engine", "label_engine"):
            engine = getattr(self, name, None)
            if engine is not None:
                engine.close()
                setattr(self, name, None)


def _row(r: dict, task: str, split: str, *, prompt: str = "", label: float | None = None, option_1: str = "",
         option_2: str = "", candidate: str = "", corrupted: bool = False, votes=None, response: str = "",
         error: str = "") -> dict:
    return {"sample_id": r["sample_id"], "task": task, "split": split, "prompt": prompt, "label": label,
            "answer": answer_text(task, label) if label is not None else "", "prefix": r["prefix_text"],
            "option_1": option_1, "option_2": option_2, "candidate": candidate, "corrupted": corrupted,
            "votes": votes, "response": response, "error": error}
