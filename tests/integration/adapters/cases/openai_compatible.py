"""OpenAI-compatible providers in the adapter table, through the `together` preset.

The table runs once per row, so the row uses the preset that differs most from OpenAI
while every table case stays meaningful: Together reports usage on the chunk that carries
the `finish_reason` (no `stream_options`, `stream_usage: final_chunk`), takes `max_tokens`,
sends its rate limits as `x-ratelimit-{limit,remaining,reset}` / `x-tokenlimit-*`, has no
request-id header (the completion id, like `8f1c2d3e4a5b6c7d-EWR`, is the vendor id) and
reports no cached or reasoning token counts. Its context overflow has no error code: the
adapter knows it by the message. Every preset is checked in `test_openai_compatible_adapter.py`.

The simulator serves each preset under `/<preset>/v1` and its default base URL is
`/generic/v1`; the suffix climbs from there to `/together/v1` (RFC 3986 dot segments,
resolved by httpx when it builds the request URL).
"""

from __future__ import annotations

from . import VendorCase

CASE = VendorCase(
    vendor="openai_compatible",
    model="meta-llama/Llama-3.3-70B-Instruct-Turbo",
    reasoning_model="deepseek-ai/DeepSeek-R1",
    context_too_long={"status": 400, "error_code": "context_length_exceeded"},
    provider_options={"preset": "together"},
    base_url_suffix="/../../together/v1",
    tool_call_id_prefix="call_",
    min_tool_fragments=5,
    rate_limit_code="rate_limit_exceeded",
    reports_cached=False,
    reports_reasoning=False,
)
