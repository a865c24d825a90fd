"""Cookie codec, the per-process identity cache and its NOTIFY invalidation."""
