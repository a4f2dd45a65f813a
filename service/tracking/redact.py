"""Keeping secrets out of logs, MLflow params and artifacts."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|access_key|credential|private_key|api_key)", re.I)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def strip_userinfo(uri: str) -> str:
    """`https://user:pw@host/x` → `https://***@host/x`; other strings unchanged."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a nested dict/list config with secret values replaced.

    A value is secret when its key names a secret (secret, password, token,
    access_key, ...); credentials embedded in URIs are stripped too. Empty
    values stay empty, so "no secret configured" remains visible.
    """
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if is_secret_key(key) and value not in ("", None):
        return REDACTED
    if isinstance(value, str) and "@" in value and "://" in value:
        return strip_userinfo(value)
    return value


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict → {"a.b.c": "value"} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
