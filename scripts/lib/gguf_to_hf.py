"""Convert a GGUF model into a Hugging Face directory that vLLM loads on CPU (its GGUF kernels
need CUDA). Run with the vLLM venv's Python: `gguf_to_hf.py MODEL.gguf OUTDIR`."""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
# Loading dequantizes the GGUF; the GGUF quantizer left on the model refuses to save it.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.to(torch.bfloat16).save_pretrained(out)
