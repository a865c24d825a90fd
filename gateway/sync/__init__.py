"""Everything that asks GitLab and applies its answer: the client and the sign-in rules (SPEC §5)."""
