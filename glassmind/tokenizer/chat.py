"""The chat format: a conversation -> token ids + a loss mask that covers the assistant's tokens only.

    <|user|> What is 3 + 4? <|end|> <|assistant|> 7 <|end|>
    mask: 0   0  0  0  0  0   0        0        1   1

Each message is its role token, the content encoded as ordinary text, and the end-of-turn token. The model
learns to write the assistant's content and to end its turn (the `<|end|>` after an assistant message is
in the mask, so generation knows when to stop); it is never trained to predict what the user says. This is
the format `glassmind chat` (glassmind/infer/chat.py) renders for an instruction-tuned run.

Control tokens come only from this file. Message content is encoded with no special tokens allowed, so a
user who types "<|assistant|>" gets the characters "<|assistant|>" (ordinary byte-level pieces), never the
control token: they cannot end their turn or speak as the assistant. `encode_text` re-checks this.
"""

from __future__ import annotations

from typing import Sequence

from glassmind.common import GlassmindError

SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END = "<|end|>"      # end of turn: the eos of every generation in the chat format
PAD = "<|pad|>"      # padding only, never trained on and never equal to END (RL finds the last real token by it)
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END, PAD)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def add_chat_tokens(tokenizer) -> None:
    """Register the chat tokens on a BPE tokenizer (appended after its vocabulary; a no-op if present)."""
    if not hasattr(tokenizer, "add_special_tokens"):
        raise GlassmindError(f"a {type(tokenizer).__name__} cannot take new special tokens: the chat format "
                             "needs a byte-level BPE tokenizer")
    tokenizer.add_special_tokens([t for t in CHAT_TOKENS if t not in tokenizer.special_tokens])


def has_chat_tokens(tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


class ChatFormat:
    """Renders conversations (lists of {"role", "content"}) with a tokenizer that has the chat tokens."""

    def __init__(self, tokenizer):
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise GlassmindError(f"the tokenizer lacks the chat tokens {missing}: instruction-tune the run with "
                                 "`glassmind sft --from RUN` first (it adds them)")
        self.tokenizer = tokenizer
        specials = tokenizer.special_tokens
        self.role_ids = {role: specials[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = specials[END]
        self.pad_id = specials[PAD]
        self.control_ids = frozenset(specials.values())

    def encode_text(self, text: str) -> list[int]:
        """Content -> ids with every special token's spelling treated as plain text."""
        ids = self.tokenizer.encode(text)  # allowed_special=(): specials are ordinary text (contract)
        if self.control_ids.intersection(ids):
            raise GlassmindError("the tokenizer turned message text into a control token; it must encode "
                                 "special tokens' spellings as ordinary text unless allowed_special names them")
        return ids

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """A conversation -> (ids, mask), equal lengths; mask[i] = 1 where ids[i] is an assistant token (its
        content or the end-of-turn after it): the positions the SFT loss predicts."""
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            role = m["role"]
            if role not in self.role_ids:
                raise GlassmindError(f"unknown role {role!r}: use system, user or assistant")
            body = self.encode_text(m["content"]) + [self.end_id]
            ids += [self.role_ids[role]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The ids a model continues to write the assistant's next reply: the conversation, then <|assistant|>."""
        if messages and messages[-1]["role"] == "assistant":
            raise GlassmindError("a prompt must not end with an assistant message: the model writes that one")
        return self.render(messages)[0] + [self.role_ids["assistant"]]

    def render_reply(self, text: str) -> list[int]:
        """An assistant reply as the model writes it after the prompt: content then <|end|>."""
        return self.encode_text(text) + [self.end_id]

    def parse_reply(self, ids: Sequence[int]) -> str:
        """Generated ids -> the reply text: everything before the first <|end|> (all of it if none)."""
        ids = list(ids)
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.tokenizer.decode([i for i in ids if i != self.pad_id])
