"""What `switchyard run` plans: which simulators, adapters and base URLs, without starting them."""

from __future__ import annotations

from switchyard.common.catalog import parse_catalog
from switchyard.local_mesh import SIM_API_KEY, plan_mesh

CATALOG = """
providers:
  openai: {vendor: openai, base_url: "https://api.openai.com/v1"}
  claude: {vendor: anthropic, base_url: "https://api.anthropic.com"}
  groq: {vendor: openai_compatible, base_url: "https://api.groq.com/openai/v1", options: {preset: groq}}
models:
  - {id: openai/a, provider: openai, upstream_model: a, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "1"}}
  - {id: anthropic/b, provider: claude, upstream_model: b, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "1"}}
  - {id: groq/c, provider: groq, upstream_model: c, context_window: 1000, max_output_tokens: 100,
     prices: {input: "1", output: "1"}}
"""


def test_every_provider_without_a_key_gets_its_vendors_simulator() -> None:
    plan = plan_mesh(parse_catalog(CATALOG), free_ports=True, simulate=False, environ={})
    assert sorted(plan.simulated) == ["claude", "groq", "openai"]
    names = [child.name for child in plan.children]
    assert {"sim-openai", "sim-claude", "sim-groq"} <= set(names)
    assert {"adapter-openai", "adapter-anthropic", "adapter-openai_compatible"} <= set(names)
    edge = next(child for child in plan.children if child.name == "edge")
    roots = plan.simulator_urls
    assert edge.env["SWITCHYARD_PROVIDER_OPENAI_BASE_URL"] == roots["openai"] + "/v1"
    assert edge.env["SWITCHYARD_PROVIDER_CLAUDE_BASE_URL"] == roots["claude"]
    # One OpenAI-compatible simulator serves every preset; the provider's preset picks the path.
    assert edge.env["SWITCHYARD_PROVIDER_GROQ_BASE_URL"] == roots["groq"] + "/groq/v1"
    assert edge.env["SWITCHYARD_PROVIDER_GROQ_API_KEY"] == SIM_API_KEY
    assert edge.env["SWITCHYARD_HTTP_PORT"] != edge.env["SWITCHYARD_PORT"]


def test_a_provider_with_a_key_is_real_unless_simulation_is_forced() -> None:
    environ = {"OPENAI_API_KEY": "sk-real"}
    plan = plan_mesh(parse_catalog(CATALOG), free_ports=True, simulate=False, environ=environ)
    assert plan.real == ("openai",)
    forced = plan_mesh(parse_catalog(CATALOG), free_ports=True, simulate=True, environ=environ)
    assert "openai" in forced.simulated and forced.real == ()
