"""One logging setup for every Switchyard service.

Call :func:`configure_logging` once at process start (it is idempotent and may
be called again, e.g. by tests, to switch stream/level/format), then log with
``get_logger(__name__).info("route_planned", model=..., input_tokens=...)``.
Events are snake_case past-tense facts; context goes in keyword arguments.

Output (``json=True``) is one JSON object per line, always carrying
``timestamp`` (ISO-8601 UTC), ``level``, ``event`` and ``service``, plus
``trace_id``/``span_id`` (lowercase hex) when an OpenTelemetry span is current
and valid. Records from stdlib :mod:`logging` (grpc, asyncio, httpx, ...) are
rendered by the same pipeline at WARNING and above, with a ``logger`` key.
``json=False`` renders human-readable console lines instead.

Redaction rule (secrets and prompts never reach logs)
-----------------------------------------------------
1. Key-based: the value of any key whose lower-cased name is in
   :data:`DENY_KEYS` (``prompt``, ``prompts``, ``messages``,
   ``message_content``, ``content``, ``completion``, ``completions``, ``text``,
   ``delta``, ``api_key``, ``apikey``, ``authorization``, ``key``, ``secret``,
   ``password``, ``token_value``, ``bearer``), or that ends with ``_key``,
   ``_secret`` or ``_token``, is replaced by ``"[redacted]"``. Token counters
   (:data:`ALLOW_KEYS`: ``input_tokens``, ``output_tokens``,
   ``cached_input_tokens``, ``reasoning_tokens``, ``total_tokens``,
   ``max_tokens``, ``max_output_tokens``) are never redacted. The rule is
   applied recursively inside dict values (and lists/tuples of them).
2. Value-based: in every remaining string value (including ``event`` and the
   formatted ``exception`` traceback), anything that looks like a bearer
   credential -- ``sk-...`` keys or ``Bearer <token>`` -- is replaced by
   ``[redacted]`` (one regex, compiled once). Exception objects passed as
   values are stringified and scrubbed the same way.
"""

from __future__ import annotations

import functools
import json as _json
import logging
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = [
    "ALLOW_KEYS",
    "DENY_KEYS",
    "REDACTED",
    "configure_logging",
    "get_logger",
    "redact_processor",
    "reset_logging",
    "scrub_text",
]

REDACTED = "[redacted]"

DENY_KEYS: frozenset[str] = frozenset(
    {
        "prompt",
        "prompts",
        "messages",
        "message_content",
        "content",
        "completion",
        "completions",
        "text",
        "delta",
        "api_key",
        "apikey",
        "authorization",
        "key",
        "secret",
        "password",
        "token_value",
        "bearer",
    }
)
DENY_SUFFIXES: tuple[str, ...] = ("_key", "_secret", "_token")
ALLOW_KEYS: frozenset[str] = frozenset(
    {
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "total_tokens",
        "max_tokens",
        "max_output_tokens",
    }
)

# "Bearer <credential>" (any case) or an OpenAI/Anthropic-style "sk-..." key.
_SECRET_RE = re.compile(
    r"(?P<bearer>\b[Bb][Ee][Aa][Rr][Ee][Rr]\s+)[A-Za-z0-9\-._~+/]+=*"
    r"|\bsk-[A-Za-z0-9_\-]{6,}"
    r"|\bsy-[a-z0-9]{8}-[A-Za-z0-9]{16,}"
)
_MAX_DEPTH = 8
_STDLIB_MIN_LEVEL = logging.WARNING

_LEVELS: dict[str, int] = {
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "NOTSET": logging.NOTSET,
}


# --------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=2048)
def _is_sensitive_key(key: str) -> bool:
    k = key.lower()
    if k in ALLOW_KEYS:
        return False
    return k in DENY_KEYS or k.endswith(DENY_SUFFIXES)


def _sub_secret(match: re.Match[str]) -> str:
    prefix = match.group("bearer")
    return f"{prefix}{REDACTED}" if prefix else REDACTED


def scrub_text(text: str) -> str:
    """Replace bearer-looking credentials (``sk-...``, ``Bearer x``) in *text*."""
    return _SECRET_RE.sub(_sub_secret, text)


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _is_sensitive_key(k) else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        return scrub_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor applying the module's redaction rule (see docstring)."""
    for k, v in event_dict.items():
        if _is_sensitive_key(k):
            event_dict[k] = REDACTED
        elif isinstance(v, str):
            event_dict[k] = scrub_text(v)
        elif v is not None and not isinstance(v, int | float | bool):
            event_dict[k] = _scrub(v)
    return event_dict


# --------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------


class _State:
    """Mutable settings read at log time, so that loggers cached by structlog
    (``cache_logger_on_first_use``) follow re-configuration."""

    def __init__(self) -> None:
        self.service = "unknown"
        self.stream: TextIO | None = None  # None -> sys.stderr at write time
        self.lock = threading.Lock()
        # Same list object for the life of the process; mutated in place.
        self.processors: list[Processor] = []
        self.handler: _StreamHandler | None = None
        self.saved_root_level: int | None = None


_STATE = _State()


def _add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("service", _STATE.service)
    return event_dict


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


def _add_trace_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict["trace_id"] = format(ctx.trace_id, "032x")
        event_dict["span_id"] = format(ctx.span_id, "016x")
    return event_dict


_FIRST_KEYS = ("timestamp", "level", "event", "service")


def _json_default(obj: Any) -> str:
    return scrub_text(str(obj))


def _render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    ordered: dict[str, Any] = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return _json.dumps(ordered, default=_json_default, ensure_ascii=False)


def _write(line: str) -> None:
    stream = _STATE.stream if _STATE.stream is not None else sys.stderr
    with _STATE.lock:
        stream.write(line + "\n")
        stream.flush()


class _StreamLogger:
    """structlog "wrapped logger": writes already-rendered lines to the
    currently configured stream."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        _write(message)

    log = debug = info = warn = warning = msg
    err = error = critical = exception = fatal = failure = msg


def _logger_factory(*args: Any) -> _StreamLogger:
    return _StreamLogger(args[0] if args and isinstance(args[0], str) else None)


class _StreamHandler(logging.Handler):
    """stdlib handler writing formatted records to the configured stream."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # pragma: no cover - mirrors logging.StreamHandler
            self.handleError(record)


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown log level: {level!r}") from None


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def configure_logging(
    service: str,
    *,
    level: str = "INFO",
    json: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog + stdlib logging for *service*.

    Idempotent: later calls replace the previous settings (service, level,
    renderer, stream) without stacking handlers. *stream* defaults to
    ``sys.stderr`` (resolved at write time). The level applies to structlog
    loggers first used after this call (structlog caches loggers on first use);
    stdlib records are emitted at ``max(WARNING, level)``.
    """
    min_level = _parse_level(level)
    _STATE.service = service
    _STATE.stream = stream

    renderer: Processor
    if json:
        renderer = _render_json
    else:
        target = stream if stream is not None else sys.stderr
        isatty = getattr(target, "isatty", None)
        colors = bool(isatty()) if callable(isatty) else False
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_processor,
        renderer,
    ]
    _STATE.processors[:] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_service,
        timestamper,
        _add_logger_name,
        _add_trace_context,
        *tail,
    ]
    structlog.configure(
        processors=_STATE.processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        logger_factory=_logger_factory,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            _add_service,
            timestamper,
            _add_trace_context,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    stdlib_level = max(_STDLIB_MIN_LEVEL, min_level)
    root = logging.getLogger()
    if _STATE.saved_root_level is None:
        _STATE.saved_root_level = root.level
    if _STATE.handler is None or _STATE.handler not in root.handlers:
        _STATE.handler = _StreamHandler()
        root.addHandler(_STATE.handler)
    _STATE.handler.setFormatter(formatter)
    _STATE.handler.setLevel(stdlib_level)
    root.setLevel(stdlib_level)


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests): detach the stdlib handler, restore
    the root logger level and structlog's defaults; output goes to stderr."""
    root = logging.getLogger()
    if _STATE.handler is not None:
        root.removeHandler(_STATE.handler)
        _STATE.handler = None
    if _STATE.saved_root_level is not None:
        root.setLevel(_STATE.saved_root_level)
        _STATE.saved_root_level = None
    _STATE.stream = None
    _STATE.service = "unknown"
    structlog.reset_defaults()


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """Return a structlog logger; *name* is rendered as the ``logger`` key.

    Safe to call at import time, before :func:`configure_logging`.
    """
    logger: FilteringBoundLogger = structlog.get_logger() if name is None else structlog.get_logger(name)
    return logger
