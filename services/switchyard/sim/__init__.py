"""Vendor API simulators (OpenAI, ...) used by tests, demos and benchmarks.

Run one with ``python -m switchyard.sim openai --port 0``; start one in-process
with :func:`switchyard.sim.faults.start_simulator`.
"""
