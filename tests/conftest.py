"""Shared fixtures: tiny random Llama teachers with a small trained tokenizer, so most tests run in ~0.1 s a step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _starter_corpus() or ["the quick brown fox jumps over the lazy dog"] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _starter_corpus() -> list[str]:
    return [
        line
        for path in sorted((REPO / "kdcli" / "data" / "starter").glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def make_sentencepiece_tokenizer(vocab_size: int = 700):
    """A SentencePiece-style BPE (Llama 2's scheme: `▁` for spaces, `<0xNN>` byte fallback, `</s>` as EOS) trained
    on the starter data: other merges, other vocabulary, another way of writing spaces than `make_tiny_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # The byte tokens go in as the trainer's special tokens, so that they are in the model's vocabulary, where byte
    # fallback looks for them.
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *bytes_]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_starter_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE.replace("<|im_end|>\n{% endfor %}", "</s>\n{% endfor %}")
    return fast


def make_tiny_llama(
    path: Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
    sentencepiece: bool = False,
) -> Path:
    """Save a random tiny Llama with the tiny tokenizer (or the SentencePiece-style one) to `path` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_sentencepiece_tokenizer(vocab_size) if sentencepiece else make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama teacher (vocab ~512, hidden 64) saved as an HF folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def tiny_other_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose vocabulary differs from `tiny_teacher`'s: for the mismatch check."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-other"), vocab_size=300)


@pytest.fixture()
def kd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kd-home"
    monkeypatch.setenv("KD_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def builtin_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KD_HOME holding the real built-in teacher, converted once for the session."""
    from kdcli.models import builtin_model_dir

    home = tmp_path_factory.mktemp("kd-home-builtin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_HOME", str(home))
        builtin_model_dir("smollm2-135m-instruct")
    return home
