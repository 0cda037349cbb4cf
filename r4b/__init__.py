"""r4b: an open, fast trainer for auto-thinking multimodal LLMs (the R-4B recipe)."""

__version__ = "0.1.0"
