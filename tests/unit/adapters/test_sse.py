"""The incremental SSE parser: framing per the WHATWG event-stream rules, any chunking."""

from __future__ import annotations

import pytest

from switchyard.adapters.base import SseError, SseEvent, SseParser


def feed_all(chunks: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


STREAM = (
    b": keep-alive comment\n"
    b'data: {"a":1}\n\n'
    b"event: update\n"
    b"id: 7\n"
    b"data: line one\n"
    b"data: line two\n\n"
    b"data:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SseEvent(b'{"a":1}'),
    SseEvent(b"line one\nline two", "update", "7"),
    SseEvent(b"no-space", None, "7"),
    SseEvent(b"[DONE]", None, "7"),
]


def test_whole_stream_in_one_chunk() -> None:
    assert feed_all([STREAM]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@pytest.mark.parametrize("split", range(1, len(STREAM)))
def test_every_split_point(split: int) -> None:
    assert feed_all([STREAM[:split], STREAM[split:]]) == EXPECTED


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_line_endings(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    assert feed_all([stream]) == EXPECTED
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == EXPECTED


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    events = feed_all([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])
    assert events == [SseEvent(b"a"), SseEvent(b"b")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert feed_all([b"\n\n\nevent: ping\n\n: comment\n\n"]) == []


def test_event_type_does_not_leak_into_the_next_event() -> None:
    events = feed_all([b"event: error\ndata: x\n\ndata: y\n\n"])
    assert events == [SseEvent(b"x", "error"), SseEvent(b"y")]


def test_unknown_fields_retry_and_bare_names_are_ignored() -> None:
    events = feed_all([b"retry: 100\nfoo: bar\ndata\ndata: z\n\n"])
    # A bare "data" line is a data field with an empty value.
    assert events == [SseEvent(b"\nz")]


def test_only_one_leading_space_is_stripped() -> None:
    assert feed_all([b"data:  two spaces\n\n"]) == [SseEvent(b" two spaces")]


def test_leading_byte_order_mark_is_skipped() -> None:
    assert feed_all([b"\xef\xbb\xbfdata: x\n\n"]) == [SseEvent(b"x")]


def test_multibyte_utf8_split_across_chunks_survives() -> None:
    payload = "data: héllo — 世界\n\n".encode()
    events = feed_all([payload[:9], payload[9:14], payload[14:]])
    assert events[0].data.decode() == "héllo — 世界"


def test_close_dispatches_an_unterminated_last_event() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n\ndata: [DONE]") == [SseEvent(b"a")]
    assert parser.close() == [SseEvent(b"[DONE]")]


def test_close_with_nothing_pending() -> None:
    parser = SseParser()
    parser.feed(b"data: a\n\n")
    assert parser.close() == []


def test_oversized_event_is_refused() -> None:
    parser = SseParser(max_event_bytes=32)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 64 + b"\n")
    parser = SseParser(max_event_bytes=32)
    with pytest.raises(SseError):
        for _ in range(10):
            parser.feed(b"data: " + b"x" * 8)  # an endless line, never terminated


def test_empty_chunks_are_harmless() -> None:
    parser = SseParser()
    assert parser.feed(b"") == []
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == [SseEvent(b"a")]
