"""The loaded model, and the one way it generates.

`minislm.load(...)` returns a `Model`: the config, the weights, the tokenizer and
generation_config.json, plus what the weights really are and the KV cache dtype
that `load` chose for them. Its methods are the library's API: `logits`,
`forward` through a cache, `generate`, `beam_search`, `image_prompt`. Every
argument is checked here, once, at that boundary; minislm/model.py below it is the
math and nothing else.

The generation policy is the second half of this file, and the only one: the
Python API, `python -m minislm generate` / `chat` and the server all call it, so the
same ids with the same settings give the same tokens everywhere:

    sampling_settings   the call's values first, then generation_config.json's when it
                        asks for sampling (do_sample), else greedy; as transformers does
    make_sampler        never picks an id the tokenizer has no piece for
    stop_ids            generation_config.json's ids plus the tokenizer's own end token
    generate_ids        the checked entry into the loop of minislm/generate.py, or its
                        speculative twin in minislm/speculative.py when given a drafter
    make_drafter        prompt lookup or a draft model with the same vocabulary
    json_grammar        the mask of a JSON schema (minislm/grammar.py)
    beam_search         the same ids and stops for minislm/beam.py
    reuse_cached_prefix a cache that already holds the start of the prompt feeds only the rest
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .beam import BeamStats, Hypothesis
from .beam import beam_search as run_beam_search
from .cache import KVCache
from .config import GenerationConfig, ModelConfig
from .errors import MinislmError
from .finite import check_logits
from .generate import GenerationStats, check_context, generate_tokens
from .formats.kernel_weights import GatheredInputs, StackedRows
from .grammar import ANY_JSON_OBJECT, JsonGrammar
from .kernels import Bf16Weight, DecodeRows, Fp32Weight, Int4Weight, Int8Weight, KQuantWeight
from .kernels.reference import KQUANT_KINDS, KQUANT_NAMES
from .kernels.threads import blas_libraries
from .logprobs import Logprobs, TokenLogprob
from .model import NO_TRACE, crosses_rope_switch, forward, forward_batch, lm_head
from .sampling import Sampler, SamplingSettings
from .speculative import DEFAULT_NUM_DRAFT, DraftModel, PromptLookup, speculative_tokens

# What `speculate=` (generate --speculate) may name besides a draft model.
SPECULATE_KINDS = ("lookup",)


@dataclass(frozen=True)
class WeightsFormat:
    """What a model's matrices really are, read from the weights themselves (a GGUF
    Q4_K_M file is Q4_K with Q5_K and Q6_K matrices, whatever was asked for).

    `kinds` counts the matrices of each kind ("float32", "bf16", "int4 g32", "Q4_K",
    ...), most bytes first; `format`, `bits` and `group_size` describe the kind that
    holds the most bytes (a K-quant's group is its sub-block: 32, or 16 for Q6_K).
    """

    kinds: tuple[tuple[str, int], ...]
    format: str  # "float32", "bf16", "int4", "int8", or a K-quant: "Q4_K", "Q5_K", "Q6_K"
    bits: int
    group_size: int | None
    kv_cache: str

    @classmethod
    def of(cls, weights: dict, kv_cache: str) -> "WeightsFormat":
        sizes, counts = {}, {}
        for w in matrices_of(weights.values()):
            kind = matrix_kind(w)
            sizes[kind] = sizes.get(kind, 0) + int(getattr(w, "nbytes", 0))
            counts[kind] = counts.get(kind, 0) + 1
        kinds = tuple((k, counts[k]) for k in sorted(sizes, key=lambda k: -sizes[k]))
        main = kinds[0][0] if kinds else "float32"
        name, _, group = main.partition(" g")
        if name in K_QUANT_SUB_BLOCKS:  # "Q4_K": 4 bits, llama.cpp's sub-blocks
            return cls(kinds, name, int(name[1]), K_QUANT_SUB_BLOCKS[name], kv_cache)
        bits = {"float32": 32, "bf16": 16}.get(name) or (int(name[3:]) if name.startswith("int") else 0)
        return cls(kinds, name, bits, int(group) if group else None, kv_cache)

    def describe(self) -> str:
        """e.g. 'int4 g32 (1 matrix int8 g32), KV cache float16'."""
        main, rest = self.kinds[0][0] if self.kinds else "float32", self.kinds[1:]
        others = ", ".join(f"{n} {'matrix' if n == 1 else 'matrices'} {k}" for k, n in rest)
        return f"{main}{f' ({others})' if others else ''}, KV cache {self.kv_cache}"


def matrices_of(weights):
    """The matrices among `weights`, a stack of parts of different types ([q | k | v] of
    a `llama` GGUF, RowStack in formats/grouped.py) as its parts, and act-order's
    gathered inputs as the weight they wrap. Norm gains and biases are left out."""
    for w in weights:
        if isinstance(w, StackedRows):
            yield from matrices_of(w.parts)
        elif isinstance(w, GatheredInputs):
            yield w.weight
        elif getattr(w, "ndim", 2) == 2:
            yield w


# "Q4_K" -> its sub-block (32; Q6_K 16), what WeightsFormat reports as the group size
K_QUANT_SUB_BLOCKS = {name: KQUANT_KINDS[bits][0] for bits, name in KQUANT_NAMES.items()}


def matrix_kind(w) -> str:
    """'float32', 'bf16', 'int4 g32' / 'int8 g16' for minislm.kernels' packed weights,
    'Q4_K' / 'Q5_K' / 'Q6_K' for K-quants kept as the file has them; any other object
    that multiplies itself is named by its class."""
    if isinstance(w, (np.ndarray, Fp32Weight)):
        return "float32"
    if isinstance(w, Bf16Weight):
        return "bf16"
    if isinstance(w, (Int4Weight, Int8Weight)):
        return f"int{w.BITS} g{w.group_size}"
    if isinstance(w, KQuantWeight):
        return w.kind
    return type(w).__name__


def decode_weights(weights: dict) -> dict:
    """The same weights, each matrix multiplying every row of a decode step as it would
    multiply that row alone (`decode_matrix`). Nothing is copied."""
    return {name: decode_matrix(w) for name, w in weights.items()}


def decode_matrix(w):
    """`w`, multiplied the way one-token decoding multiplies it, for any number of rows.

    Batched decoding (minislm/batch.py) sends the next token of several sequences through
    one forward, and a sequence's tokens must not depend on its neighbours. The packed
    int4/int8 and K-quant kernels already give every row the same bits for one row or many. float32
    and bf16 matrices would go to BLAS's GEMM for several rows, which sums in another
    order than the one-row GEMV: they take the GEMV kernel for every row instead
    (`kernels.DecodeRows`), still reading each weight once per step. Anything else is
    multiplied one row at a time, which is invariant by construction.
    """
    if getattr(w, "ndim", 2) != 2 or isinstance(w, (Int4Weight, Int8Weight, KQuantWeight, DecodeRows, OneRowAtATime)):
        return w  # vectors (norms, biases), and matrices already row-independent
    if isinstance(w, (np.ndarray, Fp32Weight, Bf16Weight)):
        return DecodeRows(w)
    if isinstance(w, StackedRows):
        return StackedRows([decode_matrix(part) for part in w.parts])
    if isinstance(w, GatheredInputs):
        return GatheredInputs(decode_matrix(w.weight), w.order)
    return OneRowAtATime(w)


class OneRowAtATime:
    """A matrix of a kind `decode_matrix` knows nothing about, multiplied row by row."""

    def __init__(self, weight):
        self.weight, self.shape = weight, weight.shape

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.weight.matmul(x[t : t + 1]) for t in range(len(x))])  # (B, out)

    def rows(self, ids):
        return self.weight.rows(ids)


# ---------------------------------------------------------------- threads

# A forward pass over fewer tokens than this (a decode step, a chat's new turn) runs
# BLAS on the calling thread alone; a longer prefill gives BLAS all its threads.
BLAS_THREADS_FROM_TOKENS = 64


@contextmanager
def blas_threads(n_tokens: int):
    """BLAS on one thread for a short forward pass, its own count for a long one.

    Two thread pools share the cores: Numba's (the kernels, attention) and BLAS's (the
    float32 matmuls). Each splits a call's work evenly over its threads and spins while
    it waits for the slowest, so when a thread of one pool has lost its core (to the
    other pool's spinning threads, a server's other requests, another program) the
    whole call waits for it. On the shipped model a 20-token follow-up on a 400-token
    cache took 180-790 ms this way, often more than a fresh 420-token prefill, and
    17-70 ms with BLAS on one thread; decode steps were no slower. A long prefill's big
    matmuls gain from BLAS's threads, so they keep them (docs/serve.md has the figures).
    """
    if n_tokens >= BLAS_THREADS_FROM_TOKENS:
        yield
        return
    limits = blas_libraries().limit(limits=1)
    try:
        yield
    finally:
        limits.restore_original_limits()


class Model:
    """A loaded checkpoint: config + weights + tokenizer (see `minislm.load`).

    `kv_cache` is the cache dtype `load` decided for these weights (cache.DTYPES);
    `weights_format` says what the weights are. `packing` is the QuantConfig minislm
    packed them with (at load, or in the int4 folder it read), which `quantize` writes
    down again; None for float weights and for files quantized by other tools.
    """

    def __init__(self, config: ModelConfig, weights: dict, *, kv_cache: str, tokenizer=None,
                 generation_config: GenerationConfig | None = None, path=None, packing=None, adapters=None):
        self.config = config
        self.weights = weights
        self.adapters = adapters or {}  # LoRA adapters by name (Phi-4-multimodal: "vision", "speech")
        self.adapter = None  # the one applied to `weights` (see with_adapter)
        self.base_model = None  # the model without it
        self.kv_cache = kv_cache
        self.weights_format = WeightsFormat.of(weights, kv_cache)
        self.packing = packing
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig(eos_token_ids=config.eos_token_ids)
        self.path = path
        # What every decode step multiplies by, one sequence or several (decode_matrix).
        self.decode_weights = decode_weights(weights)

    def new_cache(self, capacity: int, dtype: str | None = None) -> KVCache:
        """An empty cache for `capacity` positions, in `dtype` or the model's `kv_cache`."""
        return KVCache(self.config, capacity, dtype or self.kv_cache)

    def check_ids(self, token_ids, image_features=None) -> np.ndarray:
        """A 1-D sequence of integer ids as int64, each in [0, vocab_size) or, with
        Phi-3-vision, negative (an image placeholder) with one row of `image_features`
        each. Anything else is refused, not coerced: 2-D ids would be flattened, floats
        truncated, bools read as ids 0 and 1."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"token ids must be a 1-D sequence, got an array of shape {ids.shape}")
        if ids.size == 0:
            return ids.astype(np.int64)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        placeholders = int(np.count_nonzero(ids < 0))
        if ids.max() >= self.config.vocab_size or (placeholders and image_features is None):
            raise MinislmError(f"token ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        if image_features is not None:
            shape = (placeholders, self.config.hidden_size)
            if self.config.vision is None and self.config.phi4mm is None:
                raise MinislmError(f"{self.path}: a {self.config.model_type} model has no image encoder")
            if np.shape(image_features) != shape:
                raise MinislmError(f"image_features of shape {np.shape(image_features)} for {placeholders} placeholders; expected {shape}")
        return ids.astype(np.int64)

    def forward(self, token_ids, cache: KVCache, trace=None, image_features=None) -> np.ndarray:
        """Hidden states (T, D) of new tokens appended to `cache`; `trace` an optional
        `minislm.trace.Recorder`. Phi-3-vision: `image_features` (k, D) for the k image
        placeholders (negative ids) among the tokens (see `image_prompt`).

        The cache's owner decides what to do when the sequence crosses LongRoPE's switch
        point: a full forward then rotates *every* position with the other factor set,
        so the cached keys are stale. Re-rotating them is not enough: from layer 1 on,
        the cached keys and values of earlier tokens were computed from attention
        outputs that used the old rotation, and those change too. The only way to get
        what a full forward gives is to run one, once, over all cached tokens plus the
        new ones. transformers' generate() does the same (it drops its cache).
        """
        ids = self.check_ids(token_ids, image_features)
        trace = NO_TRACE if trace is None else trace
        if crosses_rope_switch(self.config, cache, len(ids)):
            # the images of the cached tokens go in again, at the same positions
            everything = np.concatenate([cache.tokens[: cache.length], ids])
            features = cache.cached_image_features(image_features)
            cache.truncate(0)
            with blas_threads(len(everything)):
                return forward(self.config, self.weights, everything, cache, trace, features)[-len(ids) :]
        with blas_threads(len(ids)):  # BLAS on one thread for a short pass
            return forward(self.config, self.weights_for(len(ids)), ids, cache, trace, image_features)

    def lm_head(self, hidden: np.ndarray, trace=None) -> np.ndarray:
        with blas_threads(len(hidden)):
            return lm_head(self.config, self.weights_for(len(hidden)), hidden, NO_TRACE if trace is None else trace)

    def weights_for(self, n_tokens: int) -> dict:
        """One token is a decode step: its matrices multiply as in `decode_step`, so a
        sequence decoded alone and in a batch gets the same bits. More tokens (a prefill)
        take the fast many-row paths (BLAS's GEMM, AMX)."""
        return self.decode_weights if n_tokens == 1 else self.weights

    def decode_step(self, token_ids, caches: list[KVCache]) -> np.ndarray:
        """Next-token logits (B, V) of B sequences, each one new token after its own
        cache (batched decoding, minislm/batch.py): row b equals, bit for bit, what
        `lm_head(forward([token_ids[b]], caches[b]))` gives.

        A sequence whose new token crosses LongRoPE's switch point has to run its whole
        sequence again (`forward`): it goes alone, the others together.
        """
        ids = self.check_ids(token_ids)
        if len(ids) != len(caches):
            raise ValueError(f"{len(ids)} token ids for {len(caches)} caches: one new token per sequence")
        logits = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
        alone = [b for b, cache in enumerate(caches) if crosses_rope_switch(self.config, cache, 1)]
        together = [b for b in range(len(ids)) if b not in alone]
        with blas_threads(1):
            if together:
                hidden = forward_batch(self.config, self.decode_weights, ids[together], [caches[b] for b in together])
                logits[together] = lm_head(self.config, self.decode_weights, hidden)
            for b in alone:
                logits[b] = self.lm_head(self.forward(ids[b : b + 1], caches[b]))[0]
        return logits

    def logits(self, token_ids, trace=None, image_features=None) -> np.ndarray:
        """Full forward from an empty cache: float32 logits (T, vocab_size)."""
        ids = self.check_ids(token_ids, image_features)
        if ids.size == 0:
            raise ValueError("logits() needs at least one token id")
        if len(ids) > self.config.max_position_embeddings:
            raise MinislmError(
                f"logits() got {len(ids)} token ids; the model's context is {self.config.max_position_embeddings} "
                "(max_position_embeddings)"
            )
        cache = self.new_cache(len(ids))
        hidden = self.forward(ids, cache, trace, image_features)
        logits = np.ascontiguousarray(self.lm_head(hidden, trace), dtype=np.float32)
        check_logits(self, logits, ids)
        return logits

    def image_prompt(
        self, prompt: str, images, num_crops: int | None = None, system: str | None = None, chat: bool = True, trace=None
    ):
        """Phi-3-vision: a prompt and its images (paths or Pillow images) -> a
        `minislm.vision.prompt.ImagePrompt` (ids with placeholders + encoded images):

            p = model.image_prompt("What is shown?", ["photo.png"])
            for token in model.generate(p.ids, 100, image_features=p.features): ...

        `<|image_k|>` tags mark where each image goes; without any, they all go first.
        With `chat` the prompt is one user turn in the model's chat template.
        `num_crops` (1..16) defaults to preprocessor_config.json's; a `trace` recorder
        gets each image's views, patch features and tokens.
        """
        from .vision.prompt import build_image_prompt, with_image_tags

        text = with_image_tags(prompt, len(images))
        if chat and self.tokenizer.chat_template:
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            text = self.tokenizer.render_chat(turns)
        return build_image_prompt(self, text, list(images), num_crops, trace)

    def multimodal_prompt(self, prompt: str, images=(), audios=(), system: str | None = None, chat: bool = True,
                          trace=None, max_crops: int | None = None):
        """Phi-4-multimodal: a prompt, its images (paths or Pillow images) and sounds
        (paths, bytes, or (samples, rate)) -> a `minislm.multimodal.prompt.MultimodalPrompt`:
        ids with placeholders, the encoded inputs, and the adapter the reference uses
        for them ("vision" with a picture, "speech" with sound only, None for text):

            p = model.multimodal_prompt("Transcribe the audio clip.", audios=["talk.wav"])
            for token in model.with_adapter(p.adapter).generate(p.ids, 100, image_features=p.features): ...

        `<|image_k|>` / `<|audio_k|>` tags mark where each goes; without any, all images
        then all audios go first. With `chat` the prompt is one user turn in the chat
        template. A `trace` recorder gets each input's steps; `max_crops` (1..64) caps the
        448x448 crops per image (default: preprocessor_config.json's dynamic_hd, 36).
        """
        from .multimodal.prompt import build_multimodal_prompt, with_tags

        images, audios = list(images), list(audios)
        text = with_tags(prompt, len(images), len(audios))
        if chat and self.tokenizer.chat_template:
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            text = self.tokenizer.render_chat(turns)
        return build_multimodal_prompt(self, text, images, audios, trace, max_crops)

    def with_adapter(self, adapter, merge: bool = False) -> "Model":
        """This model with a LoRA adapter: a name from `adapters` ("vision", "speech"), a
        `minislm.lora.Adapter`, or None for the plain model. The weights are shared; each
        adapted matrix computes W·x + (B·(A·x))·scale, or, with `merge`, W + scale·B·A
        is formed once (for when one modality is fixed: faster, a copy of those matrices)."""
        from .lora import merge_adapter, with_adapter

        base = self.base_model or self
        if isinstance(adapter, str):
            if adapter not in base.adapters:
                known = ", ".join(base.adapters) or "none"
                raise MinislmError(f"{base.path}: no adapter {adapter!r} (this model has: {known})")
            adapter = base.adapters[adapter]
        if adapter is self.adapter and not merge:
            return self
        if adapter is None:
            return base
        weights = merge_adapter(base.weights, adapter) if merge else with_adapter(base.weights, adapter)
        adapted = Model(base.config, weights, kv_cache=base.kv_cache, tokenizer=base.tokenizer,
                        generation_config=base.generation_config, path=base.path, packing=base.packing,
                        adapters=base.adapters)
        adapted.weights_format = base.weights_format
        adapted.base_model = base
        adapted.adapter = adapter
        return adapted

    def generate(
        self,
        token_ids,
        max_new_tokens: int,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        image_features=None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        speculate: str | None = None,
        draft_model: "Model | None" = None,
        num_draft: int = DEFAULT_NUM_DRAFT,
        json_schema=None,
        logprobs: int | None = None,
    ) -> Iterator[int]:
        """New token ids after `token_ids`, decided exactly as `python -m minislm generate`
        and the server decide them (`generate_ids`): settings you leave out come from
        generation_config.json when it asks for sampling (do_sample), else greedy; the
        repetition penalty it asks for applies to greedy decoding too, as in transformers
        (the shipped Shakespeare model asks for 1.2; pass repetition_penalty=1.0 for plain
        argmax); ids the tokenizer cannot decode are never chosen; generation stops after
        an end-of-sequence id of generation_config.json or the tokenizer.

        Arguments are checked here, when called: a bad one raises now, not at the first
        `next()`. Greedy and sampled ids stream: the iterator runs one cached forward
        per id as you read it (one prefill first). Beam search (num_beams > 1) cannot
        stream, since the best sequence is known only when the search ends: it runs
        now, and the iterator holds the best hypothesis's ids (`beam_search` returns
        several, with their scores). Phi-3-vision: `image_features` for the prompt's
        image placeholders (`image_prompt`; greedy and sampling only).

        Speculative decoding (minislm/speculative.py): `speculate="lookup"` guesses from
        the text so far, `draft_model=` (a loaded Model with the same vocabulary) guesses
        with a smaller model; `num_draft` guesses are verified per forward. Greedy ids
        are those of plain decoding, sampled ones follow the same distribution.
        `json_schema` (a dict or JSON text; needs llguidance) makes the reply a JSON
        document valid under it. `logprobs=n`: the iterator yields
        `minislm.logprobs.TokenLogprob`s instead of ids: each id with its log-probability
        and the n most likely ids of the distribution it was drawn from.
        """
        if num_beams != 1:
            if temperature not in (None, 0) or any(v is not None for v in (top_k, top_p, min_p, seed)):
                raise ValueError("beam search is deterministic: temperature, top_k, top_p, min_p and seed are for sampling")
            if image_features is not None:
                raise ValueError("beam search does not take images yet: use greedy or sampling with image_features")
            if speculate is not None or draft_model is not None or json_schema is not None or logprobs is not None:
                raise ValueError("speculate, draft_model, json_schema and logprobs are for greedy and sampled decoding, "
                                 "not beam search")
            best = self.beam_search(token_ids, max_new_tokens, num_beams, length_penalty=length_penalty,
                                    early_stopping=early_stopping, repetition_penalty=repetition_penalty)[0]
            return iter(best.ids)
        if length_penalty != 1.0 or early_stopping is not False:
            raise ValueError("length_penalty and early_stopping are for beam search (num_beams > 1)")
        settings = sampling_settings(self, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty)
        sampler = make_sampler(self, settings, seed)
        check_max_new_tokens(max_new_tokens)
        capacity = min(self.config.max_position_embeddings, len(np.asarray(token_ids).reshape(-1)) + max_new_tokens)
        drafter = make_drafter(self, sampler, capacity, speculate, draft_model, image_features=image_features)
        grammar = None if json_schema is None else json_grammar(self, json_schema)
        recorder = None if logprobs is None else Logprobs(logprobs)
        ids = generate_ids(self, token_ids, max_new_tokens, sampler, image_features=image_features, grammar=grammar,
                           logprobs=recorder, drafter=drafter, num_draft=num_draft)
        return ids if recorder is None else with_logprobs(ids, recorder)

    def beam_search(
        self,
        token_ids,
        max_new_tokens: int,
        num_beams: int,
        *,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        repetition_penalty: float | None = None,
    ) -> list[Hypothesis]:
        """The `num_return_sequences` best hypotheses (`minislm.beam.Hypothesis`: ids and
        score), best first, exactly as transformers' `generate(num_beams=num_beams,
        do_sample=False)` ranks them; see minislm/beam.py for the rules."""
        return beam_search(self, token_ids, max_new_tokens, num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                           repetition_penalty=repetition_penalty)


# ---------------------------------------------------------------- the generation policy


def sampling_settings(
    model, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None
) -> SamplingSettings:
    """Values given (not None) first, then generation_config.json's defaults when it asks
    for sampling, else greedy: what transformers' generate() does with the same files.
    `top_k=0` means off. Each value is checked here (SamplingSettings), once."""
    defaults = model.generation_config
    sampled = defaults.do_sample

    def pick(value, default, neutral):
        if value is not None:
            return value
        return default if (sampled and default is not None) else neutral

    return SamplingSettings(
        temperature=pick(temperature, defaults.temperature if defaults.temperature is not None else 1.0, 0.0),
        top_k=pick(top_k, defaults.top_k, 0) or None,
        top_p=pick(top_p, defaults.top_p, 1.0),
        min_p=pick(min_p, defaults.min_p, 0.0),
        # a logits processor in transformers, so it applies to greedy decoding too
        repetition_penalty=repetition_penalty if repetition_penalty is not None else (defaults.repetition_penalty or 1.0),
    )


def allowed_ids(model) -> int | None:
    """Ids below this are ones the tokenizer can decode: Phi-3 pads its 32,011 real ids
    to 32,064 embedding rows. None (every id) for a model loaded without a tokenizer."""
    if model.tokenizer is None:
        return None
    return min(model.tokenizer.vocab_size, model.config.vocab_size)


def make_sampler(model, settings: SamplingSettings, seed: int | None) -> Sampler:
    """A sampler that never picks the padding ids past the tokenizer's vocabulary."""
    return Sampler(settings, seed=seed, allowed_ids=allowed_ids(model))


def make_drafter(model, sampler: Sampler, capacity: int, speculate: str | None = None, draft_model=None,
                 extra=(), image_features=None):
    """The guesser of speculative decoding, or None for plain decoding: prompt lookup
    (`speculate="lookup"`, looking in `extra` ids too) or `draft_model`, whose tokenizer
    must be the target's (ids mean nothing across vocabularies). A draft model samples
    with its own random generator, spawned from the target's, so a seed fixes both."""
    if speculate is not None and speculate not in SPECULATE_KINDS:
        raise ValueError(f"speculate={speculate!r}: choose one of {', '.join(SPECULATE_KINDS)} (or pass draft_model=)")
    if speculate is not None and draft_model is not None:
        raise ValueError("speculate='lookup' and draft_model= are two ways to guess: choose one")
    if draft_model is None:
        return PromptLookup(extra=extra) if speculate == "lookup" else None
    if not isinstance(draft_model, Model):
        raise TypeError(f"draft_model must be a loaded minislm Model, got {type(draft_model).__name__}")
    if image_features is not None:
        raise MinislmError("a draft model cannot see the prompt's images: use speculate='lookup' with images")
    check_same_vocabulary(model, draft_model)
    draft_sampler = make_sampler(draft_model, sampler.settings, None)
    draft_sampler.rng = sampler.rng.spawn(1)[0]
    return DraftModel(draft_model, draft_sampler, min(capacity, draft_model.config.max_position_embeddings))


def check_same_vocabulary(model, draft) -> None:
    """Refuse a draft model whose ids mean other pieces than the target's."""
    where = f"draft model {draft.path}"
    if draft.tokenizer is None or model.tokenizer is None:
        raise MinislmError(f"{where}: speculative decoding compares tokenizers, and one of the models has none")
    if draft.config.vocab_size != model.config.vocab_size:
        raise MinislmError(f"{where}: its vocabulary has {draft.config.vocab_size} ids, the target's "
                           f"{model.config.vocab_size}; a draft model must share the target's tokenizer")
    ours = model.tokenizer.backend.get_vocab(with_added_tokens=True)
    theirs = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if ours != theirs:
        different = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[0]
        raise MinislmError(f"{where}: its tokenizer differs from the target's ({len(theirs)} vs {len(ours)} pieces; "
                           f"first difference at id {different[1]}); a draft model must share the target's tokenizer")


def json_grammar(model, schema) -> JsonGrammar:
    """The mask of a JSON schema for this model's vocabulary; `schema` True means any
    JSON object (OpenAI's response_format json_object)."""
    if model.tokenizer is None:
        raise MinislmError("a JSON schema needs the model's tokenizer (the bytes of every id)")
    return JsonGrammar(model.tokenizer, ANY_JSON_OBJECT if schema is True else schema, model.config.vocab_size,
                       stop_ids(model))


def with_logprobs(ids: Iterator[int], recorder: Logprobs) -> Iterator[TokenLogprob]:
    """Model.generate(logprobs=n): each id as the TokenLogprob recorded when it was chosen."""
    for _ in ids:
        yield recorder.entries[-1]


def stop_ids(model) -> set[int]:
    """generation_config.json's ids plus the tokenizer's own end-of-sequence token."""
    ids = set(model.generation_config.eos_token_ids)
    if model.tokenizer is not None:
        eos = model.tokenizer.special.get("eos_token")
        if eos and model.tokenizer.token_id(eos) is not None:
            ids.add(model.tokenizer.token_id(eos))
    return ids


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def generate_ids(
    model,
    prompt_ids,
    max_new_tokens: int,
    sampler: Sampler,
    *,
    cache: KVCache | None = None,
    history=None,
    stats: GenerationStats | None = None,
    trace=None,
    image_features=None,
    grammar: JsonGrammar | None = None,
    logprobs: Logprobs | None = None,
    drafter=None,
    num_draft: int = DEFAULT_NUM_DRAFT,
) -> Iterator[int]:
    """Up to `max_new_tokens` ids after `prompt_ids`, chosen by `sampler` (from
    `make_sampler`); this is the one entry into the loop (minislm/generate.py) for the
    library, the CLI and the server. A chat keeps one sampler, and so one random
    generator, for all its turns.

    With a `cache`, `prompt_ids` are the tokens after those it holds (`history`: all ids
    so far, for the repetition penalty). `grammar` (`json_grammar`) masks what a JSON
    schema forbids, `logprobs` records each token's log-probability, and a `drafter`
    (`make_drafter`) turns on speculative decoding with `num_draft` guesses a step.
    Everything is checked now, before the first forward.
    """
    check_max_new_tokens(max_new_tokens)
    ids = model.check_ids(prompt_ids, image_features)
    if ids.size == 0:
        raise ValueError("generate() needs at least one token id")
    check_context(len(ids), 0 if cache is None else cache.length, model.config.max_position_embeddings)
    stops = stop_ids(model)
    if drafter is None:
        return generate_tokens(model, ids, max_new_tokens, sampler, stops, cache=cache, history=history, stats=stats,
                               trace=trace, image_features=image_features, grammar=grammar, logprobs=logprobs)
    if isinstance(num_draft, bool) or not isinstance(num_draft, (int, np.integer)) or num_draft < 1:
        raise ValueError(f"num_draft must be an integer >= 1, got {num_draft!r}")
    if trace is not None:
        raise MinislmError("speculative decoding verifies several tokens per forward, so a per-token trace "
                           "(--show-experts, --save-experts) cannot follow it; drop one of them")
    return speculative_tokens(model, ids, max_new_tokens, sampler, drafter, int(num_draft), stops, cache=cache,
                              history=history, stats=stats, image_features=image_features, grammar=grammar,
                              logprobs=logprobs)


def beam_search(
    model,
    token_ids,
    max_new_tokens: int,
    num_beams: int,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    repetition_penalty: float | None = None,
    stats: BeamStats | None = None,
) -> list[Hypothesis]:
    """minislm/beam.py with the policy's stop ids, allowed ids and repetition penalty."""
    check_max_new_tokens(max_new_tokens)
    penalty = sampling_settings(model, repetition_penalty=repetition_penalty).repetition_penalty
    return run_beam_search(
        model, token_ids, max_new_tokens, num_beams, stop_ids(model), length_penalty=length_penalty,
        early_stopping=early_stopping, num_return_sequences=num_return_sequences, repetition_penalty=penalty,
        allowed_ids=allowed_ids(model), stats=stats,
    )


def reuse_cached_prefix(cache: KVCache, ids, image_features=None) -> int:
    """Keep the cached positions that begin `ids`, forget the rest; return how many were kept.

    A chat turn (or a server request) that extends the previous conversation then feeds
    only what is new, mostly the latest user message, through the model. At image
    placeholders the images must be the same too (`KVCache.shared_prefix`). At least one
    id is always left to feed, since the next token's logits come from its forward.
    """
    keep = min(cache.shared_prefix(ids, image_features), len(ids) - 1)
    cache.truncate(keep)
    return keep
