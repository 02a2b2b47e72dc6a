"""Which weights a decode step reads, in bytes: the measure of a mixture of experts.

A dense model reads every weight matrix once per generated token, so its decode
speed is bounded by memory bandwidth / model size. A PhiMoE decode step should read
the dense part (attention, norms, routers, lm_head) and the matrices of only the 2
experts per layer its router chose: bytes per token follow the *active* parameters.

`RecordingWeights` checks that rather than assuming it: it is the weights dict,
remembering every tensor name the forward looks up. The forward multiplies by the
whole of every matrix it looks up, except the embedding table, of which it reads
one row per token (unless the lm_head is tied to it and reads all of it).
"""

from dataclasses import dataclass

import numpy as np

from ..model import forward, lm_head
from ..trace import Recorder


class RecordingWeights(dict):
    """A weights dict that records the names looked up through it (`looked_up`)."""

    def __init__(self, weights: dict):
        super().__init__(weights)
        self.looked_up: set[str] = set()

    def __getitem__(self, name):
        self.looked_up.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        if name in self:
            self.looked_up.add(name)
        return super().get(name, default)


@dataclass
class StepReads:
    token: int  # the token fed in
    names: set[str]  # every tensor the step looked up
    bytes_read: int  # what those lookups cost in weight bytes
    experts: np.ndarray  # (layers, 2): the experts the router chose


def bytes_read(config, weights: dict, names, tokens: int = 1) -> int:
    """Weight bytes a forward over `tokens` tokens reads, given the names it looked up."""
    total = 0
    for name in names:
        w = dict.__getitem__(weights, name)  # do not record this lookup
        if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            total += tokens * (w.nbytes // w.shape[0])  # one row per token
        else:
            total += w.nbytes
    return total


def total_bytes(weights: dict) -> int:
    return sum(dict.__getitem__(weights, name).nbytes for name in weights)


def decode_reads(model, prompt_ids, steps: int) -> list[StepReads]:
    """Prefill `prompt_ids`, then decode `steps` greedy tokens, recording what each
    decode step reads. The model's own weights are untouched."""
    config = model.config
    recording = RecordingWeights(model.weights)
    cache = model.new_cache(len(prompt_ids) + steps)
    token = int(np.argmax(model.lm_head(model.forward(prompt_ids, cache)[-1:])[0]))
    reads = []
    for _ in range(steps):
        recording.looked_up.clear()
        trace = Recorder(names=("experts",))
        hidden = forward(config, recording, np.array([token]), cache, trace)
        logits = lm_head(config, recording, hidden)[0]
        routing = trace.per_layer("experts")
        experts = np.stack([e[-1] for e in routing]) if routing else np.zeros((0, 2), dtype=np.int64)
        names = set(recording.looked_up)
        reads.append(StepReads(token, names, bytes_read(config, recording, names), experts))
        token = int(np.argmax(logits))
    return reads
