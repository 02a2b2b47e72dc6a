"""The KV cache: the only state that changes from token to token (llama2.c's RunState).

Attention at step t needs the keys and values of every earlier token in every
layer. Recomputing them would make each new token cost as much as the whole
prompt; storing them makes a decode step one token's worth of matmuls plus one
pass over the cache. We preallocate the buffers once for the longest sequence
this run can reach, so appending is a slice assignment, never a reallocation.

The cache is read in full by every decode step (up to the sliding window), so at
long contexts its bytes cost as much as the weights': Phi-3-mini keeps
32 layers x 2 x 3072 values a token, 768 KiB in float32, and at 2k tokens that
is 1.6 GB a step, more than its int4 weights. So it can be stored smaller:

    dtype      bytes/value  error (measured, docs/performance.md)
    float32    4            none: the verified path, the default for float32 weights
    float16    2            rounding to 11 significant bits; the default for bf16/int4
    int8       1 (+ scale)  symmetric, one float32 scale per (layer, kv head, position)

API (kept small on purpose; beam search and vision build on it):

    KVCache(config, capacity, dtype="float32")
    cache.length, cache.capacity, cache.dtype, cache.tokens[:length], cache.rope_long
    cache.store(layer, k, v)           write this forward's keys/values (KV, T, hd)
    cache.layer(layer)                 the storage the attention kernel reads
    cache.read(layer, end)             keys/values [0, end) widened to float32 (plain path)
    cache.advance(token_ids, rope_long, image_features), cache.truncate(length)
    cache.shared_prefix(ids, image_features)  how many leading tokens are already cached
    cache.copy_from(other, keep)       hold what `other` holds (beam search: the beam
                                       a hypothesis continues)
    cache.bytes_per_position           bytes one position takes in all layers
"""

import os
from typing import NamedTuple

import numpy as np

from .config import ModelConfig
from .errors import MinislmError
from .kernels.attention import store_cached

DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


class LayerStorage(NamedTuple):
    """One layer's cache as stored: keys, values (KV, capacity, hd) in the cache dtype;
    key/value scales (KV, capacity) float32 for int8, else None."""

    keys: np.ndarray
    values: np.ndarray
    key_scales: np.ndarray | None
    value_scales: np.ndarray | None


class KVCache:
    """keys/values: (layers, kv_heads, capacity, head_dim) in `dtype`; positions [0, length) are filled.

    Keys are stored *after* RoPE. `rope_long` records which LongRoPE factor set the
    cached tokens were computed with, and `tokens` their ids, so the model can
    recompute them if a later forward crosses the switch point. With Phi-3-vision,
    some ids are image placeholders (< 0): `image_features` keeps what went in their
    place, one row per placeholder in position order, for that recomputation, and so
    that a chat turn reuses the cache only where the same images sit.
    """

    def __init__(self, config: ModelConfig, capacity: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"KV cache dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        self.dtype = dtype
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        bytes_per_value = np.dtype(DTYPES[dtype]).itemsize + (4 / config.head_dim if dtype == "int8" else 0)
        check_fits_in_memory(int(2 * int(np.prod(shape, dtype=object)) * bytes_per_value), capacity)
        # np.zeros gets pages lazily from the OS: an unused tail costs no memory.
        self.keys = np.zeros(shape, dtype=DTYPES[dtype])
        self.values = np.zeros(shape, dtype=DTYPES[dtype])
        scaled = dtype == "int8"
        self.key_scales = np.zeros(shape[:3], dtype=np.float32) if scaled else None
        self.value_scales = np.zeros(shape[:3], dtype=np.float32) if scaled else None
        self.tokens = np.zeros(capacity, dtype=np.int64)  # the ids whose keys/values are cached
        self.length = 0
        self.rope_long = False
        self.image_features = np.zeros((0, config.hidden_size), dtype=np.float32)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def bytes_per_position(self) -> int:
        """Bytes of keys, values (and scales) one position takes, all layers together."""
        layers, kv_heads, _, head_dim = self.keys.shape
        per_head = 2 * head_dim * self.keys.itemsize + (8 if self.key_scales is not None else 0)
        return layers * kv_heads * per_head

    def store(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write this forward's keys/values (kv_heads, T, head_dim), float32, after the
        cached ones, converting them to the cache's dtype.

        `length` moves only when the whole forward is done (`advance`), because every
        layer writes at the same positions.
        """
        end = self.length + keys.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        stored = self.layer(layer)
        # What store_cached does, in NumPy: stored.keys[:, length:end] = keys (rounding to
        # nearest for float16; int8: codes and scales as reference.quantize_cache_int8), values alike.
        store_cached(keys, stored.keys, stored.key_scales, self.length)
        store_cached(values, stored.values, stored.value_scales, self.length)

    def layer(self, layer: int) -> LayerStorage:
        """Views of one layer's storage, whole capacity, as the attention kernel reads it."""
        scales = (None, None) if self.key_scales is None else (self.key_scales[layer], self.value_scales[layer])
        return LayerStorage(self.keys[layer], self.values[layer], *scales)

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions [0, end) as float32 (KV, end, hd): the plain path."""
        stored = self.layer(layer)
        keys = stored.keys[:, :end].astype(np.float32)
        values = stored.values[:, :end].astype(np.float32)
        if stored.key_scales is not None:
            keys *= stored.key_scales[:, :end, None]
            values *= stored.value_scales[:, :end, None]
        return keys, values

    def advance(self, token_ids: np.ndarray, rope_long: bool, image_features: np.ndarray | None = None) -> None:
        """Mark the tokens of a finished forward as cached (every layer has stored them)."""
        end = self.length + len(token_ids)
        self.tokens[self.length : end] = token_ids
        self.length = end
        self.rope_long = rope_long
        if image_features is not None and len(image_features):
            self.image_features = np.concatenate([self.image_features, image_features])

    def truncate(self, length: int) -> None:
        """Forget positions >= length (a chat turn that diverges from the cached tokens)."""
        self.length = min(self.length, length)
        self.image_features = self.image_features[: self.placeholders(self.length)]

    def placeholders(self, length: int) -> int:
        """How many of the first `length` cached tokens are image placeholders."""
        return int(np.count_nonzero(self.tokens[:length] < 0))

    def cached_image_features(self, new: np.ndarray | None = None) -> np.ndarray | None:
        """The features of the cached placeholders followed by `new` ones: what a forward
        over all cached tokens and new ones needs. None when there are no images."""
        if new is None and not len(self.image_features):
            return None
        return self.image_features if new is None else np.concatenate([self.image_features, new])

    def shared_prefix(self, token_ids: np.ndarray, image_features: np.ndarray | None = None) -> int:
        """How many leading tokens of a new sequence the cache already holds: equal ids and,
        at image placeholders, equal images (two pictures of one size have the same
        placeholder ids; only their features tell them apart)."""
        n = 0
        for cached, new in zip(self.tokens[: self.length], token_ids):
            if cached != new:
                break
            n += 1
        k = self.placeholders(n)
        if k:
            same = np.zeros(k, bool) if image_features is None else np.all(self.image_features[:k] == image_features[:k], axis=1)
            if not same.all():
                first_different = int(np.argmin(same))  # the placeholder row where the images part
                n = int(np.flatnonzero(self.tokens[:n] < 0)[first_different])
        return n

    def copy_from(self, other: "KVCache", keep: int = 0) -> int:
        """Make this cache hold what `other` holds; return how many positions were copied.

        Positions before `keep` are left as they are: the caller knows they already
        equal `other`'s. Beam search knows it when two beams share their first `keep`
        tokens, because every beam's keys and values come from the same prefill and the
        same one-token forwards (or copies of them), and equal inputs give equal bits.
        (Two separate prefills of different lengths may differ in the last bits.)
        """
        if not 0 <= keep <= min(self.length, other.length):
            raise ValueError(f"keep={keep} must be within both caches' lengths ({self.length}, {other.length})")
        if other.dtype != self.dtype or other.keys.shape[:2] + other.keys.shape[3:] != self.keys.shape[:2] + self.keys.shape[3:]:
            raise ValueError("copy_from: the caches belong to different models or dtypes")
        if other.length > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {other.length} needed")
        end = other.length
        self.keys[:, :, keep:end] = other.keys[:, :, keep:end]
        self.values[:, :, keep:end] = other.values[:, :, keep:end]
        if self.key_scales is not None:  # int8: each position's scales travel with its codes
            self.key_scales[:, :, keep:end] = other.key_scales[:, :, keep:end]
            self.value_scales[:, :, keep:end] = other.value_scales[:, :, keep:end]
        self.tokens[keep:end] = other.tokens[keep:end]
        self.length = end
        self.rope_long = other.rope_long
        return end - keep

def check_fits_in_memory(nbytes: int, capacity: int) -> None:
    """Refuse a cache larger than the memory available, before allocating it.

    np.zeros would often "succeed" (the OS hands out pages lazily) and the run would
    die later, deep in a forward, when the pages are touched. A 128k-token context
    on Phi-3-mini is 48 GiB of float32 keys and values: worth one clear sentence.
    """
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise MinislmError(
            f"the KV cache for {capacity} positions needs {nbytes / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB "
            "of memory is available; ask for fewer positions (--ctx-size, --max-tokens, a shorter prompt)"
        )


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages, else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
