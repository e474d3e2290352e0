"""Switchyard's benchmark harness (`make bench`, `python -m bench`).

Measures the gateway against the same simulated upstream called directly, in one run, and
reports ratios (through the edge / direct) with the absolute numbers beside them. See
`bench/__main__.py` for the command line and DESIGN.md ("Budgets for speed") for the goals.
"""
