"""Typed run configuration: one TOML file per run, every key documented, overridable and frozen.

Each section is a dataclass; each field carries `help` (the reference manual is generated from it)
and `results` (False for keys that only change speed or logging, never the artifacts). The resolved
config of a run is frozen into `runs/<name>/sipt.toml` on first use; a later command that changes a
result-affecting key is refused unless `--force`.

This module holds the engine sections, the registry (`SECTIONS`) and the typed `Config`; the plain
sections are in `sipt.sections`, the TOML format and `--set` in `sipt.config_toml`, the range checks
in `sipt.config_checks` and freezing in `sipt.freeze`. Their public names are importable from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from sipt import config_toml
from sipt.config_checks import BOUNDS, validate  # noqa: F401 (re-exported)
from sipt.config_toml import (  # noqa: F401 (re-exported)
    apply_overrides, coerce, load_toml, parse_override, suggest, toml_value,
)
from sipt import objectives as _objectives
from sipt import schemes as _schemes
from sipt.engines import ENGINES, policy_engines  # noqa: F401 (ENGINES re-exported)
from sipt.errors import SiptError
from sipt.sections import DataConfig, ModelConfig, PairConfig, RunConfig, knob  # noqa: F401 (re-exported)
from sipt.world import WorldConfig

# ENGINES (imported above) is the engine registry of sipt/engines/__init__.py: the `engine` choices
# follow it, so a registered engine is a valid value with no edit here.


@dataclass
class EngineConfig:
    """Which engine runs a model, and how. Shared by the rollout, rewrite and judge sections."""

    engine: str = knob("hf", "hf, vllm, openai (or oracle for judge and rewrite).", choices=ENGINES)
    model: str = knob(
        "",
        "Model: a Hugging Face folder (hf, vllm) or the served model name (openai). Empty for the "
        "rollout stage: the iteration's policy.",
    )
    dtype: str = knob("auto", "auto, float32, bfloat16 or float16 (hf, vllm). auto: bf16 on GPU, fp32 on CPU.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("auto", "hf: auto (cuda if available), cpu or cuda[:N].", results=False)
    batch_size: int = knob(64, "hf: sequences per forward batch (prompts × n).", results=False)
    static_cache: bool = knob(True, "hf: preallocate the KV cache (much faster decoding than a growing cache).",
                              results=False)
    max_model_len: int = knob(0, "vllm: context length to reserve (0: the model's).", results=False)
    gpu_memory_utilization: float = knob(0.85, "vllm on GPU: fraction of GPU memory to use.", results=False)
    kv_cache_mb: int = knob(0, "vllm: KV cache size in MiB (0: 256 on CPU, vLLM's choice on GPU).", results=False)
    base_url: str = knob("http://127.0.0.1:8000/v1", "openai: server address up to /v1.")
    api_key_env: str = knob(
        "OPENAI_API_KEY", "openai: name of the environment variable holding the API key (never logged).",
        results=False,
    )
    concurrency: int = knob(8, "openai: requests in flight at once.", results=False)
    timeout_s: float = knob(120.0, "openai: seconds before a request is abandoned and retried.", results=False)
    max_retries: int = knob(5, "openai: retries on 429, 5xx and connection errors (exponential backoff).",
                            results=False)



@dataclass
class RolloutConfig(EngineConfig):
    """[rollout] How the policy writes N continuations of each prefix (engine keys as above)."""

    n: int = knob(16, "Rollouts per prefix (paper: 16; ablations 1/2/4/8/16).")
    temperature: float = knob(1.0, "Sampling temperature (paper: 1.0). 0 is greedy.")
    top_p: float = knob(1.0, "Nucleus sampling (paper: 1.0). On the vllm CPU wheel top_p < 1 is ~3x slower.")
    top_k: int = knob(0, "Top-k sampling; 0 is off.")
    max_new_tokens: int = knob(0, "Tokens to generate; 0: data.suffix_tokens (paper: 128).")
    stop_at_eos: bool = knob(True, "Let a rollout end early at the end-of-text token (counted as finish_reason=stop).")
    prompts_per_part: int = knob(64, "Prefixes per output part (the unit of resume and of scale-out).")


@dataclass
class RewriteConfig(EngineConfig):
    """[rewrite] The teacher that rewrites suffixes (paper §5): oracle (toy world) or a prompted model."""

    engine: str = knob("oracle", "oracle (toy world), hf, vllm or openai.", choices=ENGINES)
    template: str = knob("rewrite", "Prompt template: a name in data/prompts/ or a path to a .txt file.")
    prefix_ending_words: int = knob(5, "Last words of the prefix prepended to suffix and rewrite (paper: 5).")
    chat: bool = knob(True, "Wrap the prompt in the model's chat template (instruct models).")
    temperature: float = knob(0.0, "Sampling temperature of the rewriter; 0 is greedy.")
    top_p: float = knob(1.0, "Nucleus sampling of the rewriter.")
    max_new_tokens: int = knob(0, "Tokens to generate; 0: 2 x data.suffix_tokens (the text is then cut to the suffix length in policy tokens).")
    world: str = knob("", "oracle: the toy world folder (with kb.json). Empty: <run>/world.")


OBJECTIVES = tuple(_objectives.OBJECTIVES)  # the built-in objectives (sipt/objectives.py); stages read the registry
CANDIDATES = ("suffix", "rewrite", "rollouts")


@dataclass
class JudgeConfig(EngineConfig):
    """[judge] The judge (paper §6): objectives, candidates, comparison scheme, verdict mode, engine."""

    engine: str = knob("oracle", "oracle (toy world), hf, vllm or openai.", choices=ENGINES)
    objectives: list = knob(
        ["quality"],
        "What is judged: quality (pairwise, `Conclusion: Option 1|2`), safety (pointwise, "
        "`FINAL DECISION: YES|NO`, YES = safe = 1), factuality (pointwise, the original suffix as "
        "reference, JSON label -> 1 / 0.5 / 0), coherence (pairwise A/B/TIE; for evaluation). Paper: "
        "quality + safety, or quality + factuality.",
    )
    weights: dict = knob(
        {}, "Reward = sum of weight x score over the objectives; a missing objective weighs 1 (paper: "
        "a plain sum). E.g. {quality = 1.0, safety = 2.0}.",
    )
    candidates: list = knob(
        ["suffix", "rollouts"],
        "What competes for each prefix: any of suffix (the original text), rewrite (the rewrite stage's "
        "output) and rollouts (the policy's). Paper main run: suffix + 16 rollouts.",
    )
    scheme: str = knob(
        "all-pairs",
        f"How pairwise objectives compare n candidates: {_schemes.described()}.",
        choices=_schemes.SCHEMES,  # the live registry: a registered scheme is a valid value
    )
    swap: bool = knob(False, "Judge every comparison in both orders (cancels position bias; twice the calls).")
    repeats: int = knob(
        1, "Judge every comparison and pointwise item this many times (seeded samples at temperature "
        "and top_p) and average (paper safety judge: 5). Ignored in logprob mode (deterministic).",
    )
    mode: str = knob(
        "generate",
        "generate: the judge reasons, then the parser reads the last verdict marker. logprob: one "
        "forward pass on the prompt plus the verdict's opening words; the soft score comes from the "
        "verdict tokens' probabilities (far cheaper, no reasoning).",
        choices=("generate", "logprob"),
    )
    templates: dict = knob(
        {}, "Prompt template per objective: a name in data/prompts/ or a path to a .txt file. Missing: "
        "data/prompts/<objective>.txt. E.g. {quality = \"my/quality.txt\"}.",
    )
    chat: bool = knob(True, "Wrap prompts in the model's chat template (instruct judges).")
    temperature: float = knob(1.0, "Judge sampling temperature in generate mode (paper: 1.0).")
    top_p: float = knob(1.0, "Judge nucleus sampling (paper: 1.0; its fine-tuned safety judge: 0.6).")
    max_new_tokens: int = knob(512, "generate mode: most tokens of reasoning plus verdict (paper: 512).")
    parse_retries: int = knob(
        2, "A response without a readable verdict is asked again this many times (new seed), then "
        "recorded as invalid and left out of the scores.",
    )
    noise: float = knob(0.0, "oracle: share of verdicts flipped at random (seeded), to imitate a fallible judge.")
    world: str = knob("", "oracle: the toy world folder (with kb.json). Empty: <run>/world.")
    min_consistency: float = knob(
        0.6, "Below this position consistency (the share of comparisons that give the same winner in both "
        "orders; without swap, the most the Option-1 rate allows) judge and eval warn that the judge reads "
        "the position more than the texts, and report.md shows it. Checked over >= 20 pairwise verdicts.",
        results=False,
    )
    fail_on_inconsistent: bool = knob(
        False, "Make that warning an error: the judge or eval stage stops without writing (its calls stay "
        "cached).", results=False,
    )


@dataclass
class TrainConfig:
    """[train] How `sipt train` turns an iteration's pairs (or samples) into the next policy."""

    objective: str = knob(
        "dpo", "dpo (online DPO on chosen/rejected), rf-nll (NLL on the chosen continuation) or ntp "
        "(next-token prediction on the samples' documents: the paper's pretrain baseline).",
        choices=("dpo", "rf-nll", "ntp"),
    )
    beta: float = knob(0.1, "DPO temperature beta of the sigmoid loss.")
    ntp_weight: float = knob(0.0, "Weight of an NTP loss on the samples' suffixes mixed into dpo / rf-nll.")
    chosen_nll_weight: float = knob(
        0.0, "objective = dpo: weight of an NLL loss (per token) on each pair's chosen continuation added to the "
        "DPO loss, from the same forward pass (TRL's rpo_alpha; Pang et al. 2024). 0: plain DPO. Ignored by "
        "objective = ntp (the NTP baseline shares the config); an error with rf-nll.", added=True)
    ntp_span: str = knob(
        "document", "What objective = ntp trains on: document (prefix + suffix + the rest of the document, "
        "up to data.max_prefix_tokens after the suffix, and EOS where it ends: plain pretraining) or sample "
        "(prefix + suffix only).",
        choices=("document", "sample"),
    )
    reference: str = knob(
        "iteration", "DPO reference model: the policy the iteration starts from, or the initial policy.",
        choices=("iteration", "initial"),
    )
    reuse_rollout_logprobs: bool = knob(
        True, "With reference = iteration, take the reference log-probability of a rollout candidate from "
        "the rollout stage (the same policy scored it while sampling) instead of a second forward pass. "
        "Set false when rollouts were sampled in lower precision than training (e.g. vLLM in bf16).",
    )
    lr: float = knob(5e-6, "Peak learning rate (paper: 5e-6 continual pretraining).")
    min_lr_ratio: float = knob(0.1, "Cosine decay ends at lr x this (paper: 0.1).")
    warmup_steps: int = knob(100, "Linear warmup steps at the start of the run (not of each iteration).")
    total_steps: int = knob(
        0, "Optimizer steps the cosine schedule spans over the whole run. 0: run.iterations x the "
        "steps of one iteration.",
    )
    batch_size: int = knob(256, "Pairs (or sequences) per optimizer step (paper: 256).")
    micro_batch_size: int = knob(16, "Pairs per forward pass; batch_size / micro_batch_size accumulation steps.",
                                 results=False)
    epochs: int = knob(1, "Passes over an iteration's pairs.")
    group_by_length: int = knob(
        0, "Make each epoch's batches from groups of this many batches' worth of shuffled examples, each group "
        "sorted by length, then shuffle the batches (Hugging Face's group_by_length uses 50): less padding, "
        "so faster on documents of uneven length (objective = ntp), at the cost of batches of like lengths "
        "(on the toy world's warm start they learned less per epoch: README, Benchmarks). 0: plain shuffled "
        "batches.", added=True)
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    adam_beta1: float = knob(0.9, "AdamW beta1.")
    adam_beta2: float = knob(0.95, "AdamW beta2.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm (0: off).")
    precision: str = knob("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.",
                          choices=("auto", "fp32", "bf16"))
    compile: bool = knob(False, "torch.compile the model.", results=False)
    device: str = knob("auto", "auto, cpu or cuda (under torchrun: the local rank's GPU).", results=False)
    fsdp: bool = knob(False, "Shard the model with FSDP under torchrun (models that do not fit one GPU).",
                      results=False)
    nproc_per_node: int = knob(
        1, "Processes `sipt loop` trains with: above 1 it runs the train stage as `torchrun --nproc_per_node "
        "N` (one process per GPU; gloo processes on CPU) with the loop's config; every other stage stays in "
        "the loop's process. `sipt train` is launched under torchrun by hand instead.", results=False,
    )
    checkpoint_every: int = knob(50, "Save a resumable checkpoint every N optimizer steps (0: only at the end).",
                                 results=False)
    log_every: int = knob(1, "Log loss, reward margin and accuracy, lr and tokens/s every N steps.", results=False)
    tensorboard: bool = knob(
        False, "Deprecated: use run.report_to = [\"tensorboard\"]. True adds tensorboard to run.report_to "
        "(train's curves go to the run's logs/train/, no longer to train/tb/).", results=False,
    )



@dataclass
class EvalConfig(EngineConfig):
    """[eval] How `sipt eval` measures a policy (paper §8): greedy generations on held-out prefixes,
    judged against a baseline's generations, plus lm-eval benchmarks. The engine keys choose what
    generates (hf, vllm or openai); the judge is the [judge] section's engine, model and templates."""

    prompts: int = knob(256, "Held-out prefixes to generate from (the first N of `split`; paper: 1k).")
    split: str = knob("eval", "Which samples to evaluate on (`sipt shard` marks data.eval_fraction as 'eval').")
    max_new_tokens: int = knob(0, "Greedy tokens per generation; 0: data.suffix_tokens (paper: 128).")
    baselines: list = knob(
        ["initial"], "What win rates are measured against: 'initial' (this run's iter-000/policy, the "
        "paper's Llama Base), a model folder, or another run's folder (its policy of the same iteration: "
        "equal training samples). The first one is the headline win rate.",
    )
    objectives: list = knob(
        ["quality", "coherence", "safety", "factuality"],
        "Judged metrics: quality and coherence as win rates vs each baseline (both orders), safety as "
        "% judged safe (majority of the seeds), factuality pointwise with the original suffix as reference.",
    )
    judge_seeds: int = knob(8, "Judge calls per comparison and order, each with its own seed (paper: 8).")
    judge_temperature: float = knob(0.7, "Judge sampling temperature in eval (paper: 0.7).")
    max_invalid_share: float = knob(
        0.05, "Eval fails (a clear error, nothing written) when more than this share of its judge calls "
        "gave no readable verdict; below it the unreadable ones are left out of the win rates and counted "
        "beside them (judge_invalid).",
    )
    group_by: str = knob("", "A data.meta_columns key to break the metrics down by (the toy world: 'kind').")
    at_risk_prompts: int = knob(
        300, "The toy world's at-risk safety set: at most this many held-out prefixes that end 1-3 words "
        "into an unsafe sentence of <world>/corpus/eval.jsonl, continued greedily and judged for safety "
        "(at_risk_unsafe_rate); 0: off.",
    )
    tasks: list = knob([], "lm-eval task names (built-in ones need the hub) run with lm_eval.simple_evaluate.")
    include_path: list = knob(
        [], "Folders of lm-eval task YAML (e.g. the toy world's <world>/mc: task sipt_world_mc).")
    lm_eval_limit: int = knob(0, "Documents per lm-eval task; 0: all.")
    lm_eval_batch_size: int = knob(32, "lm-eval batch size.", results=False)

# Section name -> dataclass. Later stages register their sections here.
SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "rewrite": RewriteConfig,
    "judge": JudgeConfig,
    "pair": PairConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "world": WorldConfig,
}


def register_section(name: str, cls: type) -> None:
    SECTIONS[name] = cls



def check_model(section: str, e: EngineConfig, *, required: bool = True) -> None:
    """An engine section's model must be given (unless `required` is False and it is empty) and, for
    the engines that load a folder (hf, vllm: not `served` in sipt.engines.ENGINES), be a Hugging Face
    model folder that exists."""
    if e.engine in ENGINES and ENGINES[e.engine].build is None:  # the oracle: no model
        return
    if not e.model:
        if required:
            raise SiptError(f"{section}.model is empty: name the {section} model (a folder, or the served name "
                            "for openai)")
        return
    if e.engine in ENGINES and not ENGINES[e.engine].served and not (Path(e.model) / "config.json").is_file():
        what = "no such folder" if not Path(e.model).exists() else "not a Hugging Face model folder (no config.json)"
        raise SiptError(f"{section}.model = {e.model}: {what}; {section}.engine = '{e.engine}' loads a local "
                        "model folder (for a served model use engine = 'openai')")


@dataclass
class Config:
    """A resolved run configuration: one typed field per section (so `cfg.rollout.n` can be followed
    by tools). A section added with `register_section` lives in `extra`, reachable as an attribute too."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    rollout: RolloutConfig
    rewrite: RewriteConfig
    judge: JudgeConfig
    pair: PairConfig
    train: TrainConfig
    eval: EvalConfig
    world: WorldConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # called only for names that are not fields
        try:
            return self.__dict__["extra"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def sections(self) -> dict[str, Any]:
        """Section name -> its values, in `SECTIONS` order (the order of sipt.toml)."""
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**typed, **self.extra}

    def new_tokens(self, section: str) -> int:
        """Tokens the engine of `section` (rollout, rewrite, eval, judge) generates: its max_new_tokens, or
        when that is 0 data.suffix_tokens (the rewriter: twice that; its text is cut to the suffix later)."""
        return getattr(self, section).max_new_tokens or (2 if section == "rewrite" else 1) * self.data.suffix_tokens

    def to_dict(self, *, results_only: bool = False) -> dict[str, dict[str, Any]]:
        out = {}
        for name, obj in self.sections.items():
            out[name] = {
                f.name: getattr(obj, f.name)
                for f in dataclasses.fields(obj)
                if not results_only or f.metadata.get("results", True)
            }
        return out

    def hash(self, keys: list[str]) -> str:
        """Hash of the result-affecting values of `keys` (sections, or `section.key`): the config
        fingerprint of a stage that depends on exactly those."""
        d = self.to_dict(results_only=True)
        for name, obj in self.sections.items():  # knobs added later, at their default: as before they existed
            for f in dataclasses.fields(obj):
                if config_toml.added_at_default(obj, f):
                    d[name].pop(f.name, None)
        picked = {}
        for key in sorted(keys):
            section, _, name = key.partition(".")
            picked[key] = d[section].get(name) if name else d[section]
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        lines = ["# sipt run configuration, frozen at first use. Edit with care: see `sipt status`.", ""]
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def build(data: dict[str, Any], where: str = "config") -> Config:
    """Validate a nested dict (from TOML) into a Config. Unknown keys are errors with a suggestion."""
    sections = {}
    for name in data:
        if name not in SECTIONS:
            raise SiptError(f"{where}: unknown section [{name}].{suggest(name, list(SECTIONS))}")
    for name, cls in SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise SiptError(f"{where}: [{name}] must be a table of keys")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise SiptError(
                    f"{where}: unknown key '{name}.{key}'.{suggest(key, list(fields))}"
                )
            value = coerce(where, f"{name}.{key}", value, hints[key])
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices:
                raise SiptError(
                    f"{where}: '{name}.{key}' = {value!r} is not one of {', '.join(choices)}"
                )
            kwargs[key] = value
        sections[name] = cls(**kwargs)
    typed = {f.name for f in dataclasses.fields(Config)} - {"extra"}
    return Config(**{n: s for n, s in sections.items() if n in typed},
                  extra={n: s for n, s in sections.items() if n not in typed})


FROZEN = "sipt.toml"


def resolve(run_dir: Path, config_file: Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
            *, force: bool = False, check: Callable[[Config], None] | None = None) -> Config:
    """The config a command runs with, frozen into `run_dir/sipt.toml` on first use (`sipt.freeze.resolve`)."""
    from sipt import freeze  # it builds on this module

    return freeze.resolve(run_dir, config_file, overrides, force=force, check=check)


def reference_markdown() -> str:
    """The config reference (README section), generated from the section dataclasses."""
    return config_toml.reference_markdown(SECTIONS)


def readme_with_reference(readme: str) -> str:
    """README text with the generated config reference between its two marker comments."""
    return config_toml.readme_with_reference(readme, SECTIONS)


# The judge-training stages' sections (they build on EngineConfig, so they are imported last).
from sipt.judge_sections import JudgeDataConfig, JudgeTrainConfig  # noqa: E402

register_section("judge_data", JudgeDataConfig)
register_section("judge_train", JudgeTrainConfig)

from sipt.rewriter_sections import RewriterTrainConfig  # noqa: E402

register_section("rewriter_train", RewriterTrainConfig)
