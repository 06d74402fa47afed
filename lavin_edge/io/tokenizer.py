"""Tokenizers behind one interface: SentencePiece ``tokenizer.model`` (LLaMA-1/2), Hugging Face
``tokenizer.json``, the byte-level BPE embedded in a GGUF file, and a byte tokenizer for tiny test models.

``encode`` never adds BOS/EOS: the prompt builders (``lavin_edge.model.lavin.encode_example``) place
them, so every tokenizer must leave that to them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path


class Tokenizer(ABC):
    """Common interface. ``stop_ids`` are the ids that end generation (EOS and chat end-of-turn)."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_ids: set[int]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens are written out, so decode(encode(s)) == s)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus BOS 256, EOS 257, PAD 258 (vocab 259: the ``tiny`` LLM preset)."""

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259
        self.stop_ids = {self.eos_id}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Specials carry no text; invalid byte runs (a model mid-character) decode with U+FFFD, never raise.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 ``tokenizer.model``."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: SentencePiece model has no BOS/EOS (bos={self.bos_id}, eos={self.eos_id})")
        # LLaMA's model has no pad piece (-1); padded positions are masked out, so EOS is a safe filler.
        pad = int(self.sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        self.stop_ids = {self.eos_id}

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from a GGUF vocab)."""

    def __init__(self, tok, bos_id: int, eos_id: int, pad_id: int | None = None,  # noqa: ANN001
                 stop_ids: set[int] | None = None) -> None:
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        self.stop_ids = set(stop_ids) if stop_ids else {self.eos_id}

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def special_ids(self) -> dict[str, object]:
        """The ids a saved ``tokenizer.json`` does not carry: what ``from_file(path, ids)`` takes back."""
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "stop_ids": sorted(self.stop_ids)}

    def save(self, path: str | Path) -> dict[str, object]:
        """Write ``tokenizer.json`` (vocab, merges, pre-tokenizer, decoder, special tokens); returns
        ``special_ids()`` for the caller to record beside it."""
        self.tok.save(str(path))
        return self.special_ids()

    @classmethod
    def from_file(cls, path: str | Path, ids: dict[str, object] | None = None) -> HFTokenizer:
        """``tokenizer.json``. BOS/EOS/PAD/stop ids: ``ids`` when given (as ``special_ids()`` wrote them), else
        from ``tokenizer_config.json`` / ``config.json`` beside it, else well-known token names."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        tok = _Tok.from_file(str(path))
        if ids is None:  # inside a lavin-edge model dir: the ids its config.json records (lavin_edge.modeldir)
            ids = _ids_from_model_config(path)
        if ids is not None:
            try:
                stops = {int(i) for i in ids["stop_ids"]}  # type: ignore[attr-defined]
                return cls(tok, int(ids["bos_id"]), int(ids["eos_id"]), int(ids["pad_id"]), stops)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: bad special token ids {ids!r} ({e})") from e
        special = _special_ids_from_dir(path.parent, tok)
        bos, eos, pad = special.get("bos"), special.get("eos"), special.get("pad")
        if bos is None or eos is None:
            raise ValueError(f"{path}: cannot tell BOS/EOS ids (no tokenizer_config.json/config.json naming them, "
                             "and no <s>/</s>, <|begin_of_text|>/<|end_of_text|> or <|endoftext|> token)")
        stops = {eos}
        for name in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):  # chat end-of-turn markers
            i = tok.token_to_id(name)
            if i is not None:
                stops.add(i)
        return cls(tok, bos, eos, pad, stops)


def _ids_from_model_config(path: Path) -> dict[str, object] | None:
    """The ``tokenizer`` entry of a lavin-edge model dir's config.json when it names ``path`` and its ids."""
    try:
        entry = json.loads((path.parent / "config.json").read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(entry, dict) and entry.get("file") == path.name and "bos_id" in entry:
        return entry
    return None


def _special_ids_from_dir(d: Path, tok) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    tc = d / "tokenizer_config.json"
    if tc.exists():
        cfg = json.loads(tc.read_text())
        for key in ("bos", "eos", "pad"):
            v = cfg.get(f"{key}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and tok.token_to_id(v) is not None:
                out[key] = tok.token_to_id(v)
    mc = d / "config.json"
    if mc.exists():
        cfg = json.loads(mc.read_text())
        for key in ("bos", "eos", "pad"):
            v = cfg.get(f"{key}_token_id")
            if key not in out and isinstance(v, int):
                out[key] = v
    # Well-known names when no config says otherwise.
    for key, names in (("bos", ("<s>", "<|begin_of_text|>", "<|endoftext|>")),
                       ("eos", ("</s>", "<|end_of_text|>", "<|endoftext|>"))):
        for n in names:
            if key not in out and tok.token_to_id(n) is not None:
                out[key] = tok.token_to_id(n)
    return out


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose HF tokenizer splits every digit on its own
# before the GPT-2 regex (StarCoder family; SmolLM's tokenizer.json has Digits(individual_digits=True)).
_INDIVIDUAL_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
# Pre-tokenizer names handled as plain GPT-2 byte-level; any other name is refused rather than guessed.
_GPT2_PRE = {"default", "gpt-2", "gpt2"}
_GGUF_CONTROL = 3  # llama.cpp token type: control (special) token
_GGUF_USER_DEFINED = 4


def gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """Build the byte-level BPE stored in a GGUF file (``tokenizer.ggml.model == "gpt2"``) with ``tokenizers``."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    from lavin_edge.io.llama_loaders import gguf_field

    reader = GGUFReader(str(path))
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _INDIVIDUAL_DIGITS_PRE | _GPT2_PRE:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")
    tokens: list[str] = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: duplicate tokens in the GGUF vocab")
    tok = _Tok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _INDIVIDUAL_DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match as whole tokens, not be split into bytes.
    if types is not None:
        specials = [tokens[i] for i, t in enumerate(types) if int(t) in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = int(gguf_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id")
    stops = {eos}
    eot = gguf_field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None:
        stops.add(int(eot))
    return HFTokenizer(tok, bos, eos, None if pad is None else int(pad), stops)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Detect the tokenizer kind: ``.gguf`` file, ``tokenizer.json``, ``tokenizer.model``, or a directory
    holding one of the last two; ``"bytes"`` gives the ByteTokenizer."""
    if str(path) == "bytes":
        return ByteTokenizer()
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return load_tokenizer(p / name)
        raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer.model")
    if p.suffix == ".gguf":
        return gguf_tokenizer(p)
    if p.suffix == ".json":
        return HFTokenizer.from_file(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    raise ValueError(f"{p}: unknown tokenizer file (expected .gguf, tokenizer.json or tokenizer.model)")
