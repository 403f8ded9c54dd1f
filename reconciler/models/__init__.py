"""Model files: pulling them from their sources, verifying them, and the registry."""
