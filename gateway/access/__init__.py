"""Pure decisions, no I/O: redirects, headers, route rule syntax and path normal form, policy, upstreams,
hosts, the signed assertion, the sign-in rate limit."""
