"""Separating a reasoning model's thinking from its answer.

Phi-4-reasoning, Phi-4-reasoning-plus and Phi-4-mini-reasoning write their chain of
thought first, between `<think>` and `</think>`, then the answer:

    <think>
    The user asks for 17 * 23. 17 * 20 = 340, 17 * 3 = 51, so 391.
    </think>

    17 × 23 = 391.

The tags are plain text to the tokenizer and the sampler: the thinking streams like
any other text. This module only decides, afterwards or while streaming, which
characters are reasoning and which are the answer, the way llama-server's
`reasoning_content` and DeepSeek's API return them: whitespace before `<think>` and
right after `</think>` belongs to neither; a text that never opens `<think>` is all
answer; one that opens it and never closes it (the token budget ran out while
thinking) is all reasoning. Where a chat template itself ends the prompt with
`<think>`, the reply starts inside the thinking (`opened=True`).

Two forms with one meaning: `split_reasoning` for a whole text, and
`ReasoningStream` for text arriving in pieces, where a tag may be cut anywhere
("</th" + "ink>"): it holds back a tail that could still become a tag. Their users:
`generate --hide-reasoning` and `chat --hide-reasoning` (minislm/commands.py), and
the server's `reasoning_content` (minislm/serve.py).
"""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return "", text
        text = stripped[len(THINK_OPEN):]
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return reasoning, answer.lstrip() if closed else ""


def has_thinking(text: str, opened: bool = False) -> bool:
    """Whether a reply has a think section at all (it may be empty, or never closed):
    what decides if an answer carries a `reasoning_content`."""
    return opened or text.lstrip().startswith(THINK_OPEN)


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends with `<think>` (whitespace after it aside):
    the chat template began the reply inside the thinking. Only the end counts: a user
    message that mentions `<think>` earlier in the prompt opens nothing."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningStream:
    """Feed pieces of a reply; each `add` returns the (reasoning, answer) text it settles.

    The concatenation of everything returned, `flush` included, equals
    `split_reasoning` of the whole reply, however the reply was cut."""

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"  # start -> reasoning -> closing -> answer
        self.held = ""
        self.thought = opened  # a think section was opened (by the prompt or the reply)

    def add(self, piece: str) -> tuple[str, str]:
        self.held += piece
        reasoning, answer = [], []
        while self.held:
            if self.state == "start":
                stripped = self.held.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, self.held = "reasoning", stripped[len(THINK_OPEN):]
                    self.thought = True
                elif THINK_OPEN.startswith(stripped):  # whitespace, or "<thi": wait and see
                    break
                else:
                    self.state = "answer"
            elif self.state == "reasoning":
                before, closed, after = self.held.partition(THINK_CLOSE)
                if closed:
                    reasoning.append(before)
                    self.state, self.held = "closing", after
                    continue
                keep = partial_tag_length(self.held, THINK_CLOSE)
                reasoning.append(self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                break
            elif self.state == "closing":
                self.held = self.held.lstrip()
                if self.held:
                    self.state = "answer"
            else:
                answer.append(self.held)
                self.held = ""
        return "".join(reasoning), "".join(answer)

    @property
    def thinking(self) -> bool:
        """Inside the think section: it was opened and has not closed (yet, or ever)."""
        return self.state == "reasoning"

    def flush(self) -> tuple[str, str]:
        """Whatever is held back at the end of the reply."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        if self.state == "start":
            return "", held
        return "", held.lstrip() if self.state == "closing" else held


def partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
