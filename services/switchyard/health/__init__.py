"""The health monitor: provider and model health, circuit breakers, headroom."""
