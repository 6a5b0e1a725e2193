"""Pairing the positions of two tokenizations of one response by the characters they have read
(`kdcli.data.alignment`), and the tokens two vocabularies share (`kdcli.models.vocab`)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, make_sentencepiece_tokenizer, make_tiny_tokenizer

from kdcli.data.alignment import pair_reads, reads_of
from kdcli.models import shared_vocabulary, token_bytes

# ------------------------------------------------------------------------------------ hand-made offsets


@pytest.mark.parametrize(
    ("offsets", "length", "reads"),
    [
        ([(0, 2), (2, 5)], 5, [0, 2, 5]),  # "ab cd" as "ab", " cd": EOS last, after the whole response
        ([(0, 1), (1, 2), (2, 4), (4, 5)], 5, [0, 1, 2, 4, 5]),
        # "é!" in bytes: both byte tokens report the character; the position after the first byte read half of it
        ([(0, 1), (0, 1), (1, 2)], 2, [0, -1, 1, 2]),
        # "🙂" as four byte tokens, then "x"
        ([(0, 1), (0, 1), (0, 1), (0, 1), (1, 2)], 2, [0, -1, -1, -1, 1, 2]),
        ([(0, 1), (1, 2), (2, 4)], 4, [0, 1, 2, 4]),  # "a  b" as "a", " ", " b": a run of spaces split
        ([(0, 1), (1, 4)], 4, [0, 1, 4]),  # the same as "a", "  b"
        ([(0, 1), (3, 4)], 4, [0, 1, 4]),  # trimmed offsets: the spaces go to the token after them
        ([(0, 0), (0, 1)], 1, [-1, 0, 1]),  # a zero-width first token (a prefix-space piece): not a boundary
        ([(0, 3)], 5, [0, 5]),  # trailing characters the offsets leave out: EOS still reads everything
        ([], 0, [0]),  # no tokens: EOS alone
    ],
)
def test_reads_from_offsets(offsets, length, reads) -> None:
    assert reads_of(offsets, length) == reads


def test_pairs_where_both_tokenizations_break() -> None:
    # "abc": the teacher breaks after "ab", the student after "a"; the token straddling the other's break is not paired
    teacher = reads_of([(0, 2), (2, 3)], 3)  # [0, 2, 3]
    student = reads_of([(0, 1), (1, 3)], 3)  # [0, 1, 3]
    assert pair_reads(student, teacher) == [0, -1, 2]
    assert pair_reads(teacher, student) == [0, -1, 2]
    # Half-read characters pair with nothing, however the other side splits them.
    assert pair_reads([0, -1, 1, 2], [0, -1, 1, 2]) == [0, -1, 2, 3]
    # A side cut at max_length keeps its own positions; the cut part (and EOS) pair with nothing.
    assert pair_reads([0, 1, 2, 4, 5], [0, 2]) == [0, -1, 1, -1, -1]


# ------------------------------------------------------------------------------------------ real tokenizers

TEXTS = [
    "Hello  wörld — naïve café 🙂\n\n\tx",
    "鑫鑫 is two characters of three bytes; 🙂🙂 two of four.",
    "   leading spaces, trailing ones   ",
    "tabs\tand\nnewlines\n\n\nand a <|im_end|> inside",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "byte-300": make_tiny_tokenizer(300),
        "byte-512": make_tiny_tokenizer(512),
        "sp": make_sentencepiece_tokenizer(),
    }


def starter_responses(n: int = 40) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "kdcli/data/starter/train.jsonl").read_text().splitlines()[:n]]
    return [row["response"] for row in rows]


@pytest.mark.parametrize(("a", "b"), [("byte-300", "byte-512"), ("byte-512", "sp"), ("sp", "byte-300")])
def test_paired_positions_have_read_the_same_text(tokenizers, a: str, b: str) -> None:
    """For every pair, each side's tokens before it decode to the same prefix of the response; EOS is paired."""
    one, two = tokenizers[a], tokenizers[b]
    paired = total = 0
    for text in TEXTS + starter_responses():
        ids, reads = {}, {}
        for name, tok in ((a, one), (b, two)):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids[name], reads[name] = enc["input_ids"], reads_of(enc["offset_mapping"], len(text))
        pairs = pair_reads(reads[a], reads[b])
        assert pairs[-1] == len(reads[b]) - 1, "EOS pairs with EOS"
        for i, j in enumerate(pairs):
            if j < 0:
                continue
            prefix = text[: reads[a][i]]
            assert reads[a][i] == reads[b][j]
            for name, tok, n in ((a, one, i), (b, two, j)):
                decoded = tok.decode(ids[name][:n]) if n else ""
                assert decoded.lstrip(" ") == prefix.lstrip(" "), (name, text, n)  # SentencePiece drops one lead space
        paired += sum(j >= 0 for j in pairs)
        total += len(pairs)
    assert paired / total > 0.5, "most positions of English text pair up"


def test_response_examples_record_what_each_labelled_position_read(tokenizers) -> None:
    from kdcli.data import build_examples
    from kdcli.recipe.schema import DataConfig

    rows = [{"instruction": "Say it.", "response": text} for text in TEXTS]
    cfg = DataConfig(max_length=24)
    for tok in tokenizers.values():
        examples = build_examples(rows, tok, cfg, "train", "data.train", reads=True)
        assert examples.rows == [0, 1, 2, 3] and examples.reads is not None
        for labels, reads in zip(examples.labels, examples.reads, strict=True):
            assert len(reads) == sum(label != -100 for label in labels)  # one per labelled (shifted) position
            assert reads[0] == 0 and max(reads) <= max(len(t) for t in TEXTS)
        assert build_examples(rows, tok, cfg, "train", "data.train").reads is None


# ------------------------------------------------------------------------------------------ shared tokens


def test_shared_tokens_are_the_same_bytes_one_to_one(tokenizers) -> None:
    byte, sp = tokenizers["byte-512"], tokenizers["sp"]
    table = shared_vocabulary(byte, sp, len(byte))
    assert len(table) == len(byte)
    mates = [m for m in table if m >= 0]
    assert len(mates) == len(set(mates)), "one-to-one"
    tb, ts = token_bytes(byte), token_bytes(sp)
    for t, s in enumerate(table):
        if s >= 0 and t != byte.eos_token_id:
            assert tb[t] == ts[s]
    assert table[byte.eos_token_id] == sp.eos_token_id  # <|im_end|> and </s>: both end a response
    the = byte.convert_tokens_to_ids("Ġthe")
    assert sp.convert_ids_to_tokens(table[the]) == "\u2581the"  # a space written two ways
    half = byte.convert_tokens_to_ids("Ã")  # the byte 0xC3
    assert sp.convert_ids_to_tokens(table[half]) == "<0xC3>"
    assert table[byte.convert_tokens_to_ids("<|im_start|>")] == sp.convert_tokens_to_ids("<|im_start|>")
    same = shared_vocabulary(byte, byte, len(byte))
    assert same == list(range(len(byte)))
    assert shared_vocabulary(byte, sp, len(byte) + 3)[-3:] == [-1, -1, -1]  # a padded output layer's extra rows
