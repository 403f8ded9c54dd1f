"""The OpenAI-compatible gateway: one front door routing each request to a healthy backend."""
