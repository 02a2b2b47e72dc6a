"""Input checks shared by the weight classes: one clear error each."""

import numpy as np


def check_finite(w, name):
    """Raise ValueError naming `name` if float array `w` holds NaN or inf."""
    if not np.isfinite(w).all():
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
        raise ValueError(f"{name}: {bad} of {w.size} values are NaN or inf; "
                         f"the checkpoint is damaged or was saved after a diverged step")


def as_activations(x, n_in):
    """x as a C-contiguous float32 (T, n_in) array (no copy when it already is)."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"activations of shape {x.shape} do not fit a weight with {n_in} inputs")
    return np.ascontiguousarray(x, dtype=np.float32)


def as_row_ids(ids, n_rows):
    """ids as a flat int64 array, every id in [0, n_rows) (kernels skip bounds checks)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise IndexError(f"row ids must be in [0, {n_rows}); got {ids.min()}..{ids.max()}")
    return ids
