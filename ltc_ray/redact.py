"""Keep storage credentials out of everything a job prints or writes.

Secrets are known from two places: the credential variables in the environment
(``AWS_SECRET_ACCESS_KEY``, ...) and the secret-looking values of ``--storage-options``
(registered by the CLI when it parses them). :func:`redact` replaces each of them with
``***``; the CLI's log formatter, its one-line error messages and the JSON outputs go
through it, so a message that happens to carry a secret (say, a URI built from one) is
printed without it.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

__all__ = ["RedactingFormatter", "redact", "register_storage_options", "secrets"]

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "RAY_AUTH_TOKEN",
)
# storage-option keys whose values are secret (s3fs: secret, token; gcsfs: token;
# adlfs: account_key, sas_token, connection_string; http: password, headers' auth)
_SECRET_KEY = re.compile(
    r"secret|token|password|passwd|credential|account_key|connection_string|authorization|"
    r"private",
    re.IGNORECASE,
)
MIN_LEN = 8  # shorter values would redact ordinary words; real secrets are long
MASK = "***"
_registered: set[str] = set()


def _collect(value: Any, secret: bool, out: set[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _collect(item, secret or bool(_SECRET_KEY.search(str(key))), out)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect(item, secret, out)
    elif secret and value is not None and not isinstance(value, bool):
        text = str(value)
        if len(text) >= MIN_LEN:
            out.add(text)


def register_storage_options(options: dict | None) -> None:
    """Remember the secret values of a storage-options dict (nested dicts included)."""
    if options:
        _collect(options, False, _registered)


def secrets() -> set[str]:
    """Every secret known to this process: registered ones and credential env values."""
    found = set(_registered)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= MIN_LEN:
            found.add(value)
    return found


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``***``."""
    for secret in sorted(secrets(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message and traceback alike) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
