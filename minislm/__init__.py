"""minislm: a readable, fast CPU runtime for Microsoft's Phi-3 family.

    import minislm
    model = minislm.load("microsoft/Phi-3-mini-4k-instruct")   # or a local folder
    logits = model.logits([1, 450, 7483])                      # (T, vocab) float32
    for token in model.generate([1, 450], max_new_tokens=20):  # greedy, KV-cached
        ...
"""

from .errors import MinislmError
from .load import load
from .runtime import Model

__all__ = ["load", "Model", "MinislmError"]
__version__ = "0.1.0"
