"""A small tokenizer built the way Phi-3's is: SentencePiece-style BPE with byte fallback.

Phi-3 (mini, medium, 3.5, MoE) uses Llama-2's SentencePiece vocabulary. In the
`tokenizers` library's format that is:
- normalizer: prepend "▁" to the input, then replace every space with "▁";
- no pre-tokenizer: the BPE runs over the whole normalized string;
- BPE with byte_fallback: a character outside the vocabulary becomes its
  UTF-8 bytes, as the tokens `<0x00>` … `<0xFF>`, so nothing is ever `<unk>`;
- decoder: "▁" back to space, byte tokens back to bytes, drop the leading space.
Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`; 3–258 are the 256 byte tokens; then the
learned pieces; then the chat/control tokens as "added" special tokens.

We train only the merges with `tokenizers` and lay out the ids ourselves, so
the result has exactly that shape and a runtime written for Phi-3 reads it.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Phi-3's control tokens, in Phi-3's relative order (its placeholders omitted).
CHAT_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
END_OF_TEXT, END_OF_TURN = "<|endoftext|>", "<|end|>"
WORD_START = "\u2581"  # "▁", SentencePiece's visible space

# A Phi-3.5-style template. It starts with <s> because the model was trained
# with <s> at the start of every window; chat turns end with <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def sentencepiece_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Prepend(WORD_START),
                                 normalizers.Replace(" ", WORD_START)])


def learn_merges(texts: list[str], n_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces and merges from `texts` with `tokenizers`' trainer.

    Only for training, words are cut before each "▁" and at newlines, as
    SentencePiece does: pieces may start with "▁" but never span two words or
    a line break. The shipped tokenizer has no pre-tokenizer, like Phi-3's,
    and gives the same tokens, because no learned merge crosses those cuts.
    Newlines never reach the trainer, so "\\n" stays out of the vocabulary and
    is encoded as the byte token <0x0A>, as in Llama and Phi-3.
    """
    trainer_view = Tokenizer(models.BPE())
    trainer_view.normalizer = sentencepiece_normalizer()
    trainer_view.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n+"), behavior="removed"),
        pre_tokenizers.Split(WORD_START, behavior="merged_with_next"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False)
    trainer_view.train_from_iterator(texts, trainer=trainer)
    model = json.loads(trainer_view.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)  # alphabet, then merge order
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return pieces, merges


def build_tokenizer(pieces: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """Assemble a Phi-3-shaped tokenizer from learned pieces and merges."""
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for token in BYTE_TOKENS + pieces:
        vocab.setdefault(token, len(vocab))
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = sentencepiece_normalizer()
    tokenizer.pre_tokenizer = None
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t in [UNK, BOS, EOS] + CHAT_TOKENS])
    return tokenizer


def start_only_variant(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer as transformers 5's `LlamaTokenizer` reads it: "▁" only at the very start.

    Given tokenizer files without a config.json naming a model type it knows,
    transformers builds the class named in tokenizer_config.json; for
    `LlamaTokenizer` it swaps the "prepend ▁" normalizer for a Metaspace
    pre-tokenizer that prepends only to the first piece of text, so no "▁"
    follows a special token. Some runtimes do the same (Llama's legacy=False).
    """
    variant = Tokenizer.from_str(tokenizer.to_str())
    variant.normalizer = None
    variant.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="first",
                                                     split=False)
    return variant


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a tokenizer whose BPE model has `vocab_size` ids (chat tokens come on top)."""
    n_pieces = vocab_size - 3 - len(BYTE_TOKENS)
    if n_pieces < 100:
        raise SystemExit(f"--vocab-size {vocab_size} leaves no room for merges; use at least 512")
    pieces, merges = learn_merges(texts, n_pieces)
    return build_tokenizer(pieces, merges)


def save_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json and a hub-style tokenizer_config.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {
        "content": t, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True} for t in [UNK, BOS, EOS] + CHAT_TOKENS}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
        "unk_token": UNK,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
