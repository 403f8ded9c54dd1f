"""TensorForge: keeps declared LLM backends running and fronts them with one gateway."""

__version__ = "0.1.0"
