"""edgetune: fine-tune int4 LLMs on the device that uses them, with forward passes only."""
import os as _os

# torch's OpenMP workers spin after each op and steal the cores our kernel thread pool needs;
# passive waiting must be chosen before torch (libgomp) initializes.  A user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import EdgetuneError, FormatError, UnsupportedError

from .version import __version__  # noqa: E402
__all__ = ["load", "finetune", "Model", "EdgetuneError", "FormatError", "UnsupportedError",
           "__version__"]


def load(path, streamed_layers=(), stream_reader=None, *, quant=None, group_size=None,
         progress=True):
    """Open a GGUF model file or a Hugging Face directory (converted to int4 once, cached):
    `m.tokenize`, `m.logits`, `m.generate` (see model/lm.py, formats/hf.py)."""
    from .model.lm import load as _load
    return _load(path, streamed_layers, stream_reader, quant=quant, group_size=group_size,
                 progress=progress)


def finetune(config):
    """Run a ZO fine-tune from a TrainConfig or a dict of its fields; returns a Run."""
    from .train.loop import finetune as _finetune
    return _finetune(config)


def __getattr__(name):  # torch is imported only when a model is used (keeps `edgetune synth` lean)
    if name == "Model":
        from .model.lm import Model
        return Model
    raise AttributeError(name)
