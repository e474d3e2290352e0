"""The router: which model and provider serve a request, in what order, and why."""
