"""Tokenizers behind one small interface: a built-in byte-level one (no files, no download)
and a wrapper for a Hugging Face tokenizer found in a model directory."""

from __future__ import annotations

from typing import Protocol

from steps.plan.data_sources import Chat, fallback_chat_segments


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_segments(self, conversation: Chat) -> list[tuple[str, bool]]: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; pad, bos and eos follow (vocab 259)."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat_segments(self, conversation: Chat) -> list[tuple[str, bool]]:
        return fallback_chat_segments(conversation)


class HFTokenizer:
    """A `transformers` tokenizer seen through the same interface."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        # Many causal LMs ship without a pad token; padding is masked out anyway.
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def chat_segments(self, conversation: Chat) -> list[tuple[str, bool]]:
        """The model's own chat template, rendered turn by turn: what an assistant turn adds to
        the rendering is trained on, the rest (system, user turns, the generation prompt) is
        not. Without a template, the documented fallback (ChatML)."""
        if not getattr(self.tok, "chat_template", None):
            return fallback_chat_segments(conversation)
        messages = conversation.as_dicts()
        render = lambda turns, prompt: self.tok.apply_chat_template(  # noqa: E731
            turns, tokenize=False, add_generation_prompt=prompt)
        out, done = [], ""
        for i, (role, _) in enumerate(conversation.messages):
            if role != "assistant":
                continue
            before, upto = render(messages[:i], True), render(messages[: i + 1], False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise ValueError("the model's chat template renders earlier turns differently once later "
                                 "ones follow; its assistant turns cannot be found for the loss mask")
            out += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        rest = render(messages, False)[len(done):]
        return out + ([(rest, False)] if rest else [])
