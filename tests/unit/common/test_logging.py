from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from switchyard.common.logging import (
    REDACTED,
    configure_logging,
    get_logger,
    reset_logging,
    scrub_text,
)


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    reset_logging()


@pytest.fixture
def stream() -> io.StringIO:
    buf = io.StringIO()
    configure_logging("test", stream=buf)
    return buf


def _lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def _last(buf: io.StringIO) -> dict[str, Any]:
    lines = _lines(buf)
    assert lines, "nothing was logged"
    return lines[-1]


@pytest.mark.asyncio
async def test_json_line_has_core_fields(stream: io.StringIO) -> None:
    get_logger("switchyard.router").info("route_planned", model="m1", input_tokens=12)
    record = _last(stream)
    assert list(record)[:4] == ["timestamp", "level", "event", "service"]
    assert record["event"] == "route_planned"
    assert record["level"] == "info"
    assert record["service"] == "test"
    assert record["logger"] == "switchyard.router"
    assert record["model"] == "m1"
    assert record["input_tokens"] == 12
    ts = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert "trace_id" not in record and "span_id" not in record


@pytest.mark.asyncio
async def test_one_object_per_line_and_level_filter(stream: io.StringIO) -> None:
    log = get_logger()
    log.debug("debug_skipped")
    log.info("first_happened")
    log.warning("second_happened", detail="line\nbreak")
    records = _lines(stream)
    assert [r["event"] for r in records] == ["first_happened", "second_happened"]
    assert records[1]["level"] == "warning"
    assert records[1]["detail"] == "line\nbreak"


@pytest.mark.asyncio
async def test_trace_ids_inside_active_span(stream: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        get_logger().info("inside_span")
    get_logger().info("outside_span")
    inside, outside = _lines(stream)
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["trace_id"] == inside["trace_id"].lower() and len(inside["trace_id"]) == 32
    assert "trace_id" not in outside


@pytest.mark.asyncio
async def test_redacts_denied_keys_recursively(stream: io.StringIO) -> None:
    get_logger().info(
        "request_received",
        prompt="tell me a secret",
        Authorization="Bearer abc",
        openai_api_key="sk-live-123456789",
        refresh_token="r1",
        input_tokens=10,
        output_tokens=20,
        cached_input_tokens=3,
        reasoning_tokens=4,
        total_tokens=30,
        max_tokens=100,
        max_output_tokens=50,
        prompt_tokens=7,
        request={
            "model": "m1",
            "messages": [{"role": "user", "content": "hi"}],
            "nested": {"Password": "hunter2", "client_secret": "cs", "depth": {"key": "k"}},
            "items": [{"text": "hello", "id": 1}],
        },
    )
    record = _last(stream)
    for key in ("prompt", "Authorization", "openai_api_key", "refresh_token"):
        assert record[key] == REDACTED, key
    for key, value in {
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_input_tokens": 3,
        "reasoning_tokens": 4,
        "total_tokens": 30,
        "max_tokens": 100,
        "max_output_tokens": 50,
        "prompt_tokens": 7,
    }.items():
        assert record[key] == value, key
    request = record["request"]
    assert request["model"] == "m1"
    assert request["messages"] == REDACTED
    assert request["nested"]["Password"] == REDACTED
    assert request["nested"]["client_secret"] == REDACTED
    assert request["nested"]["depth"]["key"] == REDACTED
    assert request["items"] == [{"text": REDACTED, "id": 1}]
    raw = stream.getvalue()
    for secret in ("tell me a secret", "hunter2", "sk-live", "hello", '"hi"'):
        assert secret not in raw


@pytest.mark.asyncio
async def test_scrubs_bearer_looking_strings(stream: io.StringIO) -> None:
    log = get_logger()
    log.info("upstream sent Bearer abc.def-ghi for sk-proj-AAAAAAAAAAAA")
    try:
        raise RuntimeError("auth failed with key sk-ant-0123456789abcdef")
    except RuntimeError:
        log.exception("upstream_failed", error_detail="header was bearer xyz123")
    try:
        raise ValueError("token sk-zzzzzzzzzzzz leaked")
    except ValueError as exc:
        log.error("call_failed", error=exc)
    first, second, third = _lines(stream)
    assert first["event"] == f"upstream sent Bearer {REDACTED} for {REDACTED}"
    assert second["level"] == "error"
    assert "RuntimeError" in second["exception"]
    assert "sk-ant" not in second["exception"] and REDACTED in second["exception"]
    assert second["error_detail"] == f"header was bearer {REDACTED}"
    assert third["error"] == f"ValueError: token {REDACTED} leaked"
    assert "sk-" not in stream.getvalue()
    # ordinary text is left alone
    assert scrub_text("task-12345 uses a risk-based sk- check") == "task-12345 uses a risk-based sk- check"


@pytest.mark.asyncio
async def test_stdlib_logging_is_routed_at_warning(stream: io.StringIO) -> None:
    logging.getLogger("grpc._cython").info("noise")
    logging.getLogger("asyncio").warning("slow callback with Bearer tok123")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("httpx").error("request failed", exc_info=True)
    records = _lines(stream)
    assert [r["event"] for r in records] == [f"slow callback with Bearer {REDACTED}", "request failed"]
    assert records[0]["level"] == "warning"
    assert records[0]["logger"] == "asyncio"
    assert records[0]["service"] == "test"
    assert "timestamp" in records[0]
    assert "ZeroDivisionError" in records[1]["exception"]


@pytest.mark.asyncio
async def test_configure_is_idempotent_and_follows_new_stream() -> None:
    root = logging.getLogger()
    level_before = root.level
    first, second = io.StringIO(), io.StringIO()
    configure_logging("alpha", stream=first)
    log = get_logger("cached")
    log.info("one_logged")  # caches the logger
    configure_logging("beta", stream=second)
    configure_logging("beta", stream=second)
    log.info("two_logged")
    logging.getLogger("grpc").warning("stdlib_warned")

    ours = [h for h in root.handlers if type(h).__name__ == "_StreamHandler"]
    assert len(ours) == 1
    assert [r["event"] for r in _lines(first)] == ["one_logged"]
    assert [(r["event"], r["service"]) for r in _lines(second)] == [
        ("two_logged", "beta"),
        ("stdlib_warned", "beta"),
    ]

    reset_logging()
    assert not [h for h in root.handlers if type(h).__name__ == "_StreamHandler"]
    assert root.level == level_before


@pytest.mark.asyncio
async def test_contextvars_are_merged(stream: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="r-1", api_key="sk-should-not-show")
    get_logger().info("bound_logged")
    record = _last(stream)
    assert record["request_id"] == "r-1"
    assert record["api_key"] == REDACTED


@pytest.mark.asyncio
async def test_console_renderer() -> None:
    buf = io.StringIO()
    configure_logging("human", json=False, stream=buf, level="DEBUG")
    get_logger().debug("debug_shown", password="p4ss", input_tokens=5)
    out = buf.getvalue()
    assert "debug_shown" in out
    assert "p4ss" not in out and REDACTED in out
    assert "input_tokens=5" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])
