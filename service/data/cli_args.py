"""A tiny `key=value` argument parser (Hydra-override style) for the data CLIs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Arg:
    """One accepted key."""

    type: Callable[[str], Any]
    default: Any
    help: str
    choices: Optional[Sequence[Any]] = None
    required: bool = False


def parse_bool(text: str) -> bool:
    """true/false, yes/no, 1/0, on/off."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def usage(prog: str, spec: dict[str, Arg]) -> str:
    """Help text listing every key."""
    lines = [f"usage: python -m {prog} key=value ...", ""]
    for key, arg in spec.items():
        extra = f" (one of {', '.join(map(str, arg.choices))})" if arg.choices else ""
        default = "required" if arg.required else f"default {arg.default!r}"
        lines.append(f"  {key}: {arg.help}{extra}; {default}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str], spec: dict[str, Arg], prog: str) -> dict[str, Any]:
    """Parse `key=value` tokens; ValueError naming the key and what is accepted."""
    values = {key: arg.default for key, arg in spec.items()}
    seen = set()
    for token in argv:
        if token in ("-h", "--help", "help"):
            raise SystemExit(usage(prog, spec))
        key, sep, raw = token.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ValueError(f"argument {token!r} is not key=value; known keys: {', '.join(spec)}")
        if key not in spec:
            raise ValueError(f"unknown key {key!r}; known keys: {', '.join(spec)}")
        arg = spec[key]
        try:
            value = arg.type(raw)
        except ValueError as err:
            raise ValueError(f"{key}={raw!r}: {err}") from None
        if arg.choices is not None and value not in arg.choices:
            raise ValueError(f"{key}={raw!r} is not allowed; choose one of {', '.join(map(str, arg.choices))}")
        values[key] = value
        seen.add(key)
    missing = [key for key, arg in spec.items() if arg.required and key not in seen]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}\n\n{usage(prog, spec)}")
    return values
