"""One module per backend kind (llama.cpp, vLLM, TGI, Ollama, ...): everything the rest of
TensorForge needs to know about that inference server, declared as a `Kind` (base.py) and
registered in reconciler/backends/registry.py. Nothing here imports the configuration schema,
the gateway or the drivers: they import this."""
