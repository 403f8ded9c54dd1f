"""Backend kinds: how each inference server is started and how its health is read."""
