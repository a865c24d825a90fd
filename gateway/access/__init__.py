"""Pure decisions, no I/O: redirects, headers, routes."""
