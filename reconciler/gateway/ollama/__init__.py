"""The pieces of the Ollama surface (`reconciler/gateway/ollama_api.py`): request
translation and options, response shapes, model metadata, model management."""
