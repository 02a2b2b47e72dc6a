"""A tiny Phi-3 checkpoint whose greedy reply is known in advance, to test what happens
to a reasoning model's text after the model has written it (`--hide-reasoning`, the
server's `reasoning_content`) on the real path: tokenizer, chat template, forward
passes, sampler, detokenizer.

Random fixtures write random text, which never opens `<think>`. This model is a
bigram table built into a transformer: its layers add nothing to the residual stream
(o_proj and down_proj are zero), so the last position's hidden state is the current
token's embedding; the embeddings of the tokens in the reply are orthonormal, and the
output row of each reply token points at the embedding of the token before it. So
every token's most likely successor is the next one in `reply`, by a logit margin of
MARGIN, whatever came before it.

The chat template is Phi-4-mini-reasoning's own (tests/fixtures/chat_templates.json);
`opened=True` adds `<think>` after its generation prompt, as templates do that make
the model start inside its thinking.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from conftest import FIXTURES

HIDDEN = 32
# Logit of the intended successor minus that of any other token: e^-16 ~ 1e-7, so even
# sampling at temperature 1 over a few hundred ids follows the reply.
MARGIN = 16.0
SPECIALS = ["<|endoftext|>", "<|system|>", "<|end|>", "<|user|>", "<|assistant|>"]
# What a reasoning model writes: its thinking, the closing tag cut across two tokens (as
# BPE cuts it), then the answer, then <|end|>.
THINKING_REPLY = ["<think>", "\nThe user asks for 2 + 2.", " Two plus two is four.", "\n</th", "ink>", "\n\n",
                  "2 + 2 = 4.", "<|end|>"]
PLAIN_REPLY = ["2 + 2 = 4.", " Nothing to think about.", "<|end|>"]


def phi4_mini_reasoning_template(opened: bool = False) -> str:
    template = json.loads((FIXTURES / "chat_templates.json").read_text())["phi4_mini_reasoning"]
    if opened:
        template = template.replace("{{ '<|assistant|>' }}", "{{ '<|assistant|><think>' }}")
        assert template.count("<think>") == 1
    return template


def byte_level(text: str) -> str:
    """A text as byte-level BPE spells it in its vocabulary ("\\n" -> "Ċ", " " -> "Ġ")."""
    table = byte_level_table()
    return "".join(table[b] for b in text.encode("utf-8"))


def byte_level_table() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (the ByteLevel pre-tokenizer's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def write_steered_model(folder: Path, reply: list[str], opened: bool = False) -> Path:
    """A model folder whose greedy reply to any chat prompt is "".join(reply) (ending at
    its <|end|>). With `opened`, the template ends the prompt with <think> and the model
    continues from there: `reply` should then leave out its own "<think>"."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {piece: i for i, piece in enumerate(byte_level_table().values())}
    words = [w for w in reply if w not in SPECIALS]
    for word in words:
        vocab.setdefault(byte_level(word), len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    ids = {s: backend.token_to_id(s) for s in SPECIALS}
    backend.save(str(folder / "tokenizer.json"))

    def token(word: str) -> int:
        return ids[word] if word in SPECIALS else vocab[byte_level(word)]

    # The token the prompt ends with is the reply's first predecessor.
    last_prompt_token = vocab[byte_level(">")] if opened else ids["<|assistant|>"]
    chain = [last_prompt_token] + [token(w) for w in reply]
    size = backend.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(0)
    states = sorted(set(chain[:-1]))
    assert len(states) <= HIDDEN, "a longer reply needs a wider model"
    basis = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0]  # orthonormal columns
    embed = 0.1 * rng.standard_normal((size, HIDDEN))
    direction = {t: basis[:, k] for k, t in enumerate(states)}
    for t, u in direction.items():
        embed[t] = u * np.sqrt(HIDDEN)  # RMS 1: the final norm leaves it as it is
    lm_head = np.zeros((size, HIDDEN))
    for before, after in zip(chain, chain[1:]):
        lm_head[after] += MARGIN / np.sqrt(HIDDEN) * direction[before]

    D, inter, layer = HIDDEN, 32, "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": embed,
        layer + "input_layernorm.weight": np.ones(D),
        layer + "self_attn.qkv_proj.weight": 0.1 * rng.standard_normal((3 * D, D)),
        layer + "self_attn.o_proj.weight": np.zeros((D, D)),  # attention adds nothing
        layer + "post_attention_layernorm.weight": np.ones(D),
        layer + "mlp.gate_up_proj.weight": 0.1 * rng.standard_normal((2 * inter, D)),
        layer + "mlp.down_proj.weight": np.zeros((D, inter)),  # nor does the MLP
        "model.norm.weight": np.ones(D),
        "lm_head.weight": lm_head,
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": D, "intermediate_size": inter,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 512, "original_max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": None, "tie_word_embeddings": False,
        "vocab_size": size, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"], "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]], "do_sample": False}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": phi4_mini_reasoning_template(opened),
    }, indent=2))
    return folder
