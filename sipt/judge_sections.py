"""Config sections of the judge-training stages: [judge_data] (the corruptor and the labels) and
[judge_train] (how a judge model is trained on them). PAPER §6.5; registered in sipt.config."""

from __future__ import annotations

from dataclasses import dataclass

from sipt.config import ENGINES, EngineConfig
from sipt.sections import knob


@dataclass
class JudgeDataConfig(EngineConfig):
    """[judge_data] How `sipt judge-data` builds a judge's training set from a run's samples (PAPER
    §6.5). The engine keys choose the corruptor (oracle: the toy world's exact one); the safety
    labeller is the [judge] section's engine, model and safety template, asked `label_seeds` times."""

    engine: str = knob("oracle", "Corruptor: oracle (toy world), hf, vllm or openai.", choices=ENGINES)
    template: str = knob("corrupt", "Corruption prompt (PAPER Fig. 10): a name in data/prompts/ or a .txt path.")
    chat: bool = knob(True, "Wrap the corruption prompt in the model's chat template (instruct models).")
    temperature: float = knob(0.7, "Corruptor sampling temperature.")
    top_p: float = knob(1.0, "Corruptor nucleus sampling.")
    max_new_tokens: int = knob(0, "Corruptor tokens to generate; 0: 3 x data.suffix_tokens (marker and text).")
    world: str = knob("", "oracle: the toy world folder (with kb.json). Empty: <run>/world.")
    samples: int = knob(1024, "Train-split samples whose suffixes are corrupted (quality) and labelled (safety).")
    label_seeds: int = knob(8, "Safety labels per text, each with its own seed; only unanimous texts are kept (paper: 8).")
    label_corrupted: bool = knob(
        True, "Also label the corrupted suffixes for safety (they carry the corruptor's unsafe sentences), "
        "not only the originals: a safety set with both classes from a corpus with few unsafe texts.")
    min_safety: int = knob(16, "Fewer unanimous safety texts than this is an error (with the counts).")
    min_quality: int = knob(16, "Fewer parsed corruptions than this is an error (with the counts).")
    validation_fraction: float = knob(
        0.1, "Share of samples (by sample, so both orders of a pair stay together) held out for validation.")
    samples_per_part: int = knob(128, "Samples per output part (the unit of resume).")


@dataclass
class JudgeTrainConfig:
    """[judge_train] How `sipt judge-train` trains a judge on `sipt judge-data`'s output (PAPER §6.5).
    Quality and safety are trained jointly. `verdict` mode: supervised loss on the verdict tokens
    (the answer is the verdict alone), fast, for small models and to warm up a model that cannot
    write the verdict format yet. `grpo` mode: TRL's GRPOTrainer, the model reasons and its last
    verdict is rewarded 1 when it matches the label (paper)."""

    mode: str = knob("verdict", "verdict (supervised verdict tokens) or grpo (TRL GRPOTrainer).",
                     choices=("verdict", "grpo"))
    model: str = knob("", "The Hugging Face folder to start from. Empty: the run's iter-000/policy.")
    chat: bool = knob(True, "Wrap prompts in the model's chat template (the folder must have one); "
                            "false for a base model (then judge.chat = false too).")
    steps: int = knob(200, "Optimizer steps (paper GRPO: 500).")
    batch_size: int = knob(16, "Prompts per optimizer step (grpo: per_device_train_batch_size, a multiple "
                               "of generations; paper global batch: 256).")
    lr: float = knob(1e-4, "Learning rate (paper GRPO: constant 2e-7).")
    lr_scheduler: str = knob("constant", "constant or cosine (transformers scheduler names).",
                             choices=("constant", "cosine", "linear"))
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_prompt_tokens: int = knob(1024, "Longer prompts are cut from the left (paper: 3584).")
    generations: int = knob(16, "grpo: completions per prompt (paper: 16).")
    temperature: float = knob(0.6, "grpo: sampling temperature (paper: 0.6).")
    top_p: float = knob(0.6, "grpo: nucleus sampling (paper: 0.6).")
    max_completion_tokens: int = knob(512, "grpo: tokens of reasoning plus verdict (paper: 512).")
    beta: float = knob(0.0, "grpo: KL coefficient to the starting model (TRL's default 0: no reference model).")
    eval_every: int = knob(10, "Validation accuracy per task and Option-1 rate every N steps (0: only at the end).",
                           results=False)
    eval_limit: int = knob(256, "Validation prompts per task scored at each evaluation (0: all).", results=False)
    checkpoint_every: int = knob(20, "Save a resumable checkpoint every N steps (SIGKILL then rerun resumes).",
                                 results=False)
    device: str = knob("auto", "auto (cuda if available), cpu or cuda.", results=False)
