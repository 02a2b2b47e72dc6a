"""Chat-formatted training windows: scenes replayed as a conversation.

A model that has only seen plays never writes `<|end|>`, so `minislm chat`
would run to --max-tokens every turn and the stop-token code path would go
untested. A few windows per batch are therefore a scene rendered with the
chat template: the user says one to three speeches, the assistant answers
with the next ones, and so on, each turn closed by `<|end|>`:

    <s><|user|>
    ROMEO.
    But soft! what light through yonder window breaks?<|end|>
    <|assistant|>
    JULIET.
    Ay me!<|end|>
    ...

The text is still Shakespeare's, so these windows teach the play as well.

Two tokenizations of a chat string are in use. tokenizer.json, read by
`tokenizers` (and by transformers 5 when the folder's config.json says
model_type "phi3"), puts a "▁" at the start of every stretch of text, also
right after `<|user|>`; transformers 5 reading the tokenizer files alone
adds "▁" only at the very start (`tiny_tokenizer.start_only_variant`), and
Phi-3's own files behave the same way. Each conversation is encoded one way
or the other at random, so the model answers prompts from either.
"""

import torch

MAX_SPEECHES_PER_TURN = 3


def speeches(text: str) -> list[str]:
    """Blocks separated by a blank line: a speech (speaker line, then lines) or a stage direction."""
    return [block for block in text.split("\n\n") if block.strip()]


def randint(low: int, high: int, generator: torch.Generator) -> int:
    """A random integer in [low, high), from the run's one generator."""
    return int(torch.randint(low, high, (1,), generator=generator))


def conversation(blocks: list[str], n_chars: int, generator: torch.Generator) -> list[dict]:
    """Consecutive speeches from a random place, as alternating user/assistant turns of ~n_chars in all."""
    position = randint(0, len(blocks), generator)
    messages, size = [], 0
    while size < n_chars and position < len(blocks):
        take = randint(1, MAX_SPEECHES_PER_TURN + 1, generator)
        content = "\n\n".join(blocks[position: position + take])
        role = "user" if len(messages) % 2 == 0 else "assistant"
        messages.append({"role": role, "content": content})
        position += take
        size += len(content) + 20  # + the tokens around each turn
    return messages


def chat_window(works_blocks: list[list[str]], context: int, chars_per_token: float,
                template, encoders: tuple, generator: torch.Generator) -> torch.Tensor:
    """One training row of context + 1 token ids: a conversation, followed by another if short.

    `template` renders messages (a transformers tokenizer with the chat
    template); `encoders` are (start-only "▁", "▁" per piece) `tokenizers`
    objects, one picked at random per conversation.
    """
    ids: list[int] = []
    while len(ids) < context + 1:
        blocks = works_blocks[randint(0, len(works_blocks), generator)]
        messages = conversation(blocks, int((context + 1 - len(ids)) * chars_per_token * 1.2), generator)
        text = template.apply_chat_template(messages, tokenize=False)  # starts with "<s>"
        encoder = encoders[0] if randint(0, 2, generator) else encoders[1]
        ids += encoder.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids[: context + 1], dtype=torch.long)
