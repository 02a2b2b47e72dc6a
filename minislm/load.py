"""`minislm.load`: from a folder or repo id to a ready `Model`.

The order is the order of trust: find the folder, read config.json, open and check
every tensor against the shapes the config implies, and only then convert
weights. A bad checkpoint fails before any large allocation.
"""

import os
from pathlib import Path

import numpy as np

from .config import load_config, load_generation_config
from .hub import resolve_model_dir
from .model import Model
from .tokenizer import load_tokenizer
from .weights import check_tensors, expected_shapes, read_checkpoint, split_fused_experts


def load(model: str | os.PathLike, revision: str | None = None) -> Model:
    """Load a Phi-3 or PhiMoE checkpoint (local folder or Hugging Face repo id) for float32 inference."""
    model_dir = resolve_model_dir(model, revision)
    config = load_config(model_dir)
    tensors = split_fused_experts(read_checkpoint(model_dir), config, model_dir)
    check_tensors(tensors, config, model_dir)
    # Only the tensors the forward reads (a tied checkpoint may carry a spare lm_head copy).
    weights = {name: np.ascontiguousarray(tensors[name].float32()) for name in expected_shapes(config)}
    return Model(
        config,
        weights,
        tokenizer=load_tokenizer(model_dir),
        generation_config=load_generation_config(model_dir, config),
        path=Path(model_dir),
    )

