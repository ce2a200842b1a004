"""init: write the initial policy `iter-000/policy` from a Hugging Face folder or a fresh preset.

A fresh policy gets a byte-level BPE tokenizer trained on the corpus with `tokenizers` and a small
Llama-architecture model initialised from `run.seed`; everything is offline and saved with
`save_pretrained` (safetensors), so transformers, vLLM, TRL and lm-eval load it as any other model.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from sipt import artifacts, corpus
from sipt.config import Config
from sipt.errors import SiptError

SECTIONS = ["run.seed", "model"]
# A new tokenizer depends on which documents are read, not on how they are later cut.
CORPUS_KEYS = ["data.inputs", "data.format", "data.text_column", "data.text_unit", "data.encoding_errors",
               "data.dataset_config", "data.dataset_split", "data.on_bad_text"]
EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Llama shapes; parameter counts include untied input and output embeddings.
PRESETS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8),
}


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bounded_texts(texts), trainer=trainer)  # memory: no long document held whole
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=1_000_000,
    )


def bounded_texts(texts, limit: int | None = None):
    """Each text in pieces of at most `limit` characters (default: shard.WINDOW_CHARS), so the
    tokenizer trainer never holds a long document whole. A piece ends before a single space that
    starts a word (" word" is one pre-token of the byte-level tokenizer, and the word before it
    ends there), so the trainer counts the same words as from the whole text: the same tokenizer."""
    from stages.shard import WINDOW_CHARS

    limit = limit or WINDOW_CHARS
    for text in texts:
        start = 0
        while len(text) - start > limit:
            end = start + limit
            p = text.rfind(" ", start + limit // 2, end)
            while p > start and (text[p - 1].isspace() or text[p + 1].isspace()):
                p = text.rfind(" ", start + limit // 2, p)
            cut = p if p > start else end  # no such space: a plain cut (a run without word breaks)
            yield text[start:cut]
            start = cut
        yield text[start:]


def build_model(tokenizer, preset: str, cfg: Config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(PRESETS[preset])
    shape["vocab_size"] = len(tokenizer)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=cfg.model.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(cfg.run.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _copy_policy(src: Path, dst: Path) -> None:
    if not (src / "config.json").exists():
        raise SiptError(f"{src}: not a Hugging Face model folder (no config.json); set model.policy to one")
    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise SiptError(f"{src}: no tokenizer files; save the tokenizer next to the model")
    for item in src.iterdir():
        if item.name.startswith((".", "_")):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def check_corpus(cfg: Config, tokenizer, read: int) -> None:
    """Refuse a corpus that cannot give a single sample (empty, or every document shorter than
    min_prefix_tokens + suffix_tokens under the new tokenizer): `shard` would fail after the work."""
    d = cfg.data
    need = d.min_prefix_tokens + d.suffix_tokens
    long_enough = 0
    if read:
        # A token covers at most a few dozen characters, so the first `need * 64` tell a long document.
        docs = itertools.islice(corpus.iter_documents(d), cfg.model.tokenizer_docs)
        for doc in docs:
            if doc.text is not None and len(tokenizer(doc.text[: need * 64], add_special_tokens=False).input_ids) >= need:
                long_enough += 1
                break  # one is enough to go on; shard counts the rest
    if not long_enough:
        where = ", ".join(map(str, d.inputs))
        raise SiptError(
            f"{where}: no document is long enough for a sample: {read} documents read, {long_enough} long "
            f"enough (at least data.min_prefix_tokens + data.suffix_tokens = {d.min_prefix_tokens} + "
            f"{d.suffix_tokens} = {need} tokens), 1 needed. Add longer documents or lower data.suffix_tokens "
            "/ data.min_prefix_tokens"
        )


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work (and before the command freezes its config)."""
    if cfg.model.policy:
        if not Path(cfg.model.policy).exists():
            raise SiptError(f"model.policy = {cfg.model.policy}: no such folder")
    else:
        corpus.resolve_sources(cfg.data)  # the corpus the tokenizer is trained on exists


def run(run_dir: Path, cfg: Config, *, force: bool = False) -> dict:
    run_dir = Path(run_dir)
    m = cfg.model
    check(cfg, run_dir)
    if m.policy:
        inputs = {"source_model": artifacts.files_ref([Path(m.policy)])}
    else:
        inputs = {"corpus": corpus.input_ref(cfg.data)}
    keys = SECTIONS + ([] if m.policy else CORPUS_KEYS)
    stage = artifacts.Stage.of(run_dir, "init", cfg, keys, folder="policy", iteration=0, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        for item in stage.tmp.iterdir():  # a model folder is written whole; nothing to resume
            if item.name != artifacts.PARTIAL:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        if m.policy:
            _copy_policy(Path(m.policy), stage.tmp)
            stats = {"source": str(m.policy)}
        else:
            read = 0

            def texts():
                nonlocal read
                for doc in itertools.islice(corpus.iter_documents(cfg.data), m.tokenizer_docs):
                    if doc.text is not None:
                        read += 1
                        yield doc.text

            tokenizer = train_tokenizer(texts(), m.vocab_size or PRESETS[m.preset]["vocab_size"])
            check_corpus(cfg, tokenizer, read)
            model = build_model(tokenizer, m.preset, cfg)
            model.save_pretrained(stage.tmp, safe_serialization=True)
            tokenizer.save_pretrained(stage.tmp)
            stats = {
                "preset": m.preset,
                "parameters": sum(p.numel() for p in model.parameters()),
                "vocab_size": len(tokenizer),
            }
        return stage.commit(stats, rows=0)
