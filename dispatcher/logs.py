"""Logging: one JSON object per line for machines, a readable line on a terminal.

Fields passed with ``extra=`` (intent_id, target, attempt, outcome ...) become JSON keys. Secrets
never reach a log record: requests are logged by path, and keys live only in transport headers.
As a second line of defence the formatters mask every configured secret (``setup_logging(secrets=)``)
in the finished line, whichever library wrote it (Celery, httpx, a provider's echoed error).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__) | {"message", "asctime"}
#: shortest value masked: anything shorter would blot out ordinary words
SECRET_MIN_LENGTH = 6
_secrets: list[str] = []


def mask_secrets(line: str) -> str:
    """Replace every configured secret (as written, and as JSON would escape it) with ``<secret>``."""
    for secret in _secrets:
        if secret in line:
            line = line.replace(secret, "<secret>")
    return line


def set_secrets(values: Iterable[str]) -> None:
    forms: set[str] = set()
    for value in values:
        if len(value) >= SECRET_MIN_LENGTH:
            forms |= {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    _secrets[:] = sorted(forms, key=len, reverse=True)  # longest first: no partial masks


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return mask_secrets(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items() if v is not None)
        line = f"{when} {record.levelname:<7} {record.getMessage()}" + (f"  {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return mask_secrets(line)


def wants_json(fmt: str = "auto") -> bool:
    """JSON lines unless asked for text, or ``auto`` on a terminal."""
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def say_json(msg: str, f: Any = None) -> None:
    """A JSON line straight to stderr without locks (safe in a signal handler).

    Stands in for Celery's ``safe_say``, which prints its shutdown notices as plain text.
    """
    line = json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": "info",
                       "logger": "celery.apps.worker", "event": mask_secrets(str(msg).strip())})
    os.write(2, (line + "\n").encode())


def setup_logging(level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Route every logger (Celery's and uvicorn's included) to one stderr handler in our format."""
    set_secrets(secrets)
    use_json = wants_json(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings (e.g. Celery's) as log lines, not bare stderr text
    for noisy in ("httpx", "httpcore", "uvicorn.access", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
