"""The config file format: TOML values in and out, `--set` overrides, type checks and the reference
manual generated from the section dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from sipt.errors import SiptError


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid: {', '.join(sorted(options))}."


def coerce(where: str, key: str, value: Any, typ: Any) -> Any:
    """Check a TOML value against the field type; ints are accepted where floats are expected."""
    origin = typ if isinstance(typ, type) else getattr(typ, "__origin__", None)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict) and isinstance(value, origin):
        return value
    if isinstance(origin, type) and isinstance(value, origin) and not (
        origin is int and isinstance(value, bool)
    ):
        return value
    raise SiptError(
        f"{where}: key '{key}' must be {getattr(origin, '__name__', typ)}, got {value!r}"
    )


def load_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SiptError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SiptError(f"{path}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value`; the value is read as a TOML literal, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SiptError(f"--set {text!r}: expected section.key=value, e.g. data.suffix_tokens=64")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) for k, v in data.items()}
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(*k.split(".", 1), v) for k, v in overrides.items()]
    )
    for section, key, value in items:
        data.setdefault(section, {})[key] = value
    return data


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # torchrun ranks resolve concurrently
    tmp.write_text(text)
    tmp.replace(path)


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (a fresh one for a mutable default)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def added_at_default(obj: Any, f: dataclasses.Field) -> bool:
    """Whether `f` is a knob added after runs were made (`knob(..., added=True)`) and `obj` has it at its
    default: then it is left out of what identifies a result, as it was before the knob existed."""
    return bool(f.metadata.get("added")) and getattr(obj, f.name) == field_default(f)


def reference_markdown(sections: dict[str, type]) -> str:
    """The config reference (README section), generated from the section dataclasses."""
    lines = []
    for name, cls in sections.items():
        lines += [f"#### `[{name}]`", "", (cls.__doc__ or "").split("]", 1)[-1].strip(), ""]
        lines += ["| key | default | description |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = field_default(f)
            note = "" if f.metadata.get("results", True) else " *(speed only)*"
            lines.append(f"| `{f.name}` | `{toml_value(default)}` | {f.metadata['help']}{note} |")
        lines.append("")
    return "\n".join(lines)


README_START, README_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_with_reference(readme: str, sections: dict[str, type]) -> str:
    """README text with the generated config reference between its two marker comments."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{reference_markdown(sections)}{README_END}{tail}"
