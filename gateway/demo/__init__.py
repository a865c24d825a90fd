"""`gateway demo`: the GitLab stand-in, the whoami upstream and the wiring that runs them together."""
