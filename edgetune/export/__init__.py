"""Export a run's trained state: a merged GGUF llama.cpp runs, or a llama.cpp LoRA adapter GGUF."""
from .gguf_export import export_gguf, export_lora_adapter

__all__ = ["export_gguf", "export_lora_adapter"]
