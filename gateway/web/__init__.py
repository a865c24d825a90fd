"""Public-listener handlers: sign-in, the proxy, auth_request, pages."""
