"""`Tokenizer`: one wrapper over a Hugging Face fast tokenizer, used identically for generation and
for distillation data (the same chat formatting on both sides, docs/method.md §1).

Sources: an HF directory, GGUF metadata (via `GGUFCheckpoint.tokenizer()`), or `tiny_tokenizer()`,
a self-contained byte-level tokenizer with a ChatML template for tiny models. Models without a chat
template (base models) get a plain `User:` / `Assistant:` format.
"""

from __future__ import annotations

import os
from typing import Sequence

import transformers
from tokenizers import Tokenizer as _RawTokenizer
from tokenizers import decoders, models, pre_tokenizers

Message = dict[str, str]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Tokens that end an assistant turn in the chat formats we know; kept when present in the vocab.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")
PLAIN_STOP_STRINGS = ("\nUser:",)


class Tokenizer:
    """Text <-> ids, chat formatting and the stop tokens of one model."""

    def __init__(self, hf: transformers.PreTrainedTokenizerBase):
        self.hf = hf

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """From an HF directory or hub id (never runs remote code)."""
        return cls(transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))

    def save(self, directory: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(directory))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_id(self) -> int:
        """Id used for padding: the tokenizer's pad, else eos, else 0 (padding is masked anyway)."""
        for token_id in (self.hf.pad_token_id, self.hf.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos plus the end-of-turn tokens of the chat format."""
        ids = {self.hf.eos_token_id} if self.hf.eos_token_id is not None else set()
        vocab = self.hf.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return tuple(sorted(ids))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings that end a generation in the plain (no chat template) format."""
        return () if self.has_chat_template else PLAIN_STOP_STRINGS

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def format_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`: the chat template, or the plain format for base models."""
        if self.has_chat_template:
            return self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        parts = []
        if self.hf.bos_token:
            parts.append(self.hf.bos_token)
        for m in messages:
            parts.append(m["content"] + "\n\n" if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}\n")
        if add_generation_prompt:
            parts.append("Assistant:")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids of `format_chat(messages)`; special tokens come from the formatted text itself."""
        return self.encode(self.format_chat(messages, add_generation_prompt))

    def format_completion(self, completion: str) -> str:
        """How an assistant answer continues a prompt from `format_chat`, ending its turn."""
        if self.has_chat_template:
            full = self.format_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": completion}],
                                    add_generation_prompt=False)
            prefix = self.format_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
            if full.startswith(prefix):
                return full[len(prefix):]
            return completion + (self.hf.eos_token or "")
        return " " + completion.strip() + "\n"


def tiny_tokenizer() -> Tokenizer:
    """A self-contained byte-level tokenizer (256 byte tokens + specials) with a ChatML template."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    raw = _RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(specials)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML_TEMPLATE)
    return Tokenizer(hf)

