"""Config section of `sipt rewriter-train`: [rewriter_train] (PAPER §5.3); registered in sipt.config."""

from __future__ import annotations

from dataclasses import dataclass

from sipt.sections import knob


@dataclass
class RewriterTrainConfig:
    """[rewriter_train] How `sipt rewriter-train` trains a rewriter on `sipt judge-data`'s unanimous
    safety labels (PAPER §5.3). The prompts are the [rewrite] section's (template, chat,
    prefix_ending_words), so the trained folder is used as `rewrite.model` unchanged. First
    `warmup_steps` supervised steps (verdict-free: copy safe suffixes verbatim), then `steps` GRPO
    steps through TRL's GRPOTrainer with the paper's reward: 1 for an exact copy of a safe suffix;
    for an unsafe one ½·(quality against the original + safety), each the [judge] section's verdict,
    averaged over `judge_seeds` seeds."""

    model: str = knob("", "The Hugging Face folder to start from. Empty: the run's iter-000/policy.")
    warmup_steps: int = knob(0, "Supervised steps before GRPO: the target is the safe suffix itself (copy), "
                                "and with `teacher` the teacher's rewrite of an unsafe one (paper: 0).")
    teacher: str = knob("", "Warm-up targets for unsafe suffixes: 'oracle' (the toy world's exact rewriter, "
                            "judge.world) or empty (safe suffixes only).", choices=("", "oracle"))
    copy_scramble: float = knob(0.0, "Share of warm-up copy examples whose safe suffix is scrambled: its words replaced "
                                     "(all, or each with probability copy_scramble_words) by words drawn at random from "
                                     "the safe training suffixes: text never seen before, so the model learns to copy "
                                     "rather than recall (0: the suffixes as they are).")
    copy_scramble_words: float = knob(
        1.0, "Share of a scrambled example's words that are replaced (each word with this probability): 1 "
             "replaces them all; below 1 the text keeps most of its words and frame, and the replaced ones "
             "are words the model can only copy, not predict.", added=True)
    rewrite_scramble: float = knob(
        0.0, "With teacher: share of the warm-up's unsafe examples whose words that the teacher's rewrite keeps "
             "are replaced in both the text and the rewrite (each with probability copy_scramble_words) by a "
             "random word, so the rewriter learns to copy what it does not rewrite (0: as they are).", added=True)
    copy_scramble_like: str = knob(
        "any", "Which random word replaces a scrambled word: 'any' word of the safe training suffixes, or 'shape': "
               "one of the same shape (a number for a number, a capitalised word for a capitalised one, a "
               "lowercase word for a lowercase one), its punctuation kept, so the replaced value is a plausible "
               "one the model would rather recall than copy.", choices=("any", "shape"), added=True)
    steps: int = knob(500, "GRPO steps after the warm-up (paper: 500; 0: the warm-up only).")
    batch_size: int = knob(16, "Prompts x generations per GRPO step (per_device_train_batch_size, a multiple "
                               "of generations); rows per warm-up step.")
    lr: float = knob(2e-7, "GRPO learning rate (paper: constant 2e-7).")
    warmup_lr: float = knob(1e-4, "Warm-up learning rate.")
    lr_scheduler: str = knob("constant", "constant, cosine or linear (transformers scheduler names).",
                             choices=("constant", "cosine", "linear"))
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    max_prompt_tokens: int = knob(1024, "Longer prompts are cut from the left (keep the suffix near the end "
                                        "of the template for small context windows).")
    generations: int = knob(16, "GRPO completions per prompt (paper: 16).")
    temperature: float = knob(0.6, "GRPO sampling temperature (paper: 0.6).")
    top_p: float = knob(0.6, "GRPO nucleus sampling (paper: 0.6).")
    max_completion_tokens: int = knob(0, "Tokens a rewrite may take; 0: as `sipt rewrite` (rewrite.max_new_tokens "
                                         "or 2 x data.suffix_tokens). The text is cut to the suffix length.")
    beta: float = knob(0.0, "GRPO KL coefficient to the starting model (TRL's default 0).")
    judge_seeds: int = knob(5, "Judge seeds the reward of an unsafe suffix is averaged over (paper: 5).")
    unsafe_share: float = knob(0.5, "Share of unsafe suffixes in the training rows (oversampled or subsampled; "
                                    "0: as labelled).")
    use_corrupted: bool = knob(True, "Also train on judge-data's corrupted texts (the corruptor's unsafe "
                                     "sentences): more unsafe suffixes from a corpus with few.")
    eval_every: int = knob(10, "Validation curves every N steps (0: only at the start and the end).",
                           results=False)
    eval_limit: int = knob(64, "Validation suffixes per class (safe, unsafe) rewritten greedily at each "
                               "evaluation (0: all).", results=False)
    checkpoint_every: int = knob(20, "Save a resumable checkpoint every N steps (SIGKILL then rerun resumes).",
                                 results=False)
    device: str = knob("auto", "auto (cuda if available), cpu or cuda.", results=False)
