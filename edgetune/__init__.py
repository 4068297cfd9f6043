"""edgetune: fine-tune int4 LLMs on the device that uses them, with forward passes only."""
from .errors import EdgetuneError, FormatError, UnsupportedError
from .model.lm import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "EdgetuneError", "FormatError", "UnsupportedError", "__version__"]
