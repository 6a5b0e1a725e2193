"""The tokens two vocabularies share: what `hybrid` compares token by token across tokenizers.

Two tokens are the same when they stand for the same bytes of text. Each vocabulary entry is read back to its bytes
the way its tokenizer's decoder would: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) through the byte alphabet
(`Ġ` is a space), SentencePiece (Llama 2, Mistral, Gemma) with `▁` as a space and `<0xNN>` as the byte NN, and an
added or special token as its own text. Other tokenizers' entries are taken as their text. The map is one-to-one:
where several entries of a vocabulary spell the same bytes, the lowest id keeps them. The two EOS tokens are paired
whatever they spell: both end a response.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _scheme(tokenizer: Any) -> str:
    """`byte-level`, `sentencepiece` or `text`: how the tokenizer's decoder turns entries back into text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    found = json.dumps(decoder or {}, ensure_ascii=False)
    if '"ByteLevel"' in found:
        return "byte-level"
    if '"Metaspace"' in found or "\u2581" in found or '"ByteFallback"' in found:
        return "sentencepiece"
    return "text"


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """Each vocabulary entry (id → bytes) as the module docstring reads it."""
    scheme = _scheme(tokenizer)
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    if scheme == "byte-level":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    out: dict[int, bytes] = {}
    for text, index in tokenizer.get_vocab().items():
        byte = _BYTE_FALLBACK.match(text) if scheme == "sentencepiece" else None
        if byte:
            out[index] = bytes([int(byte.group(1), 16)])
        elif index in added or scheme == "text":
            out[index] = text.encode("utf-8")
        elif scheme == "byte-level":
            try:
                out[index] = bytes(to_byte[char] for char in text)
            except KeyError:  # not of the byte alphabet: an entry kd cannot read back; its text
                out[index] = text.encode("utf-8")
        else:
            out[index] = text.replace("\u2581", " ").encode("utf-8")
    return out


def shared_vocabulary(teacher: Any, student: Any, teacher_rows: int) -> list[int]:
    """For each teacher id below `teacher_rows` (its output layer's rows), the student's id of the token with the
    same bytes, or −1: one-to-one, EOS paired with EOS."""
    students: dict[bytes, int] = {}
    for index, text in sorted(token_bytes(student).items()):
        students.setdefault(text, index)
    table = [-1] * teacher_rows
    taken: set[int] = set()
    eos_t, eos_s = teacher.eos_token_id, student.eos_token_id
    if eos_t is not None and eos_s is not None and eos_t < teacher_rows:
        table[eos_t] = int(eos_s)
        taken.add(int(eos_s))
    for index, text in sorted(token_bytes(teacher).items()):
        mate = students.get(text)
        if index < teacher_rows and index != eos_t and mate is not None and mate not in taken:
            table[index] = mate
            taken.add(mate)
    return table
