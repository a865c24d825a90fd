"""The admin API and CLI over gateway.services."""
