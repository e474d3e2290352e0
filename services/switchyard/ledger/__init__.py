"""The cost ledger: prices, estimates, budgets, spend history, alerts and reports."""
