"""The tokenizer a dataset was prepared with, as a transformers tokenizer that encodes text exactly
as the data was encoded, and the BOS/EOS ids that go with it."""

from __future__ import annotations

import pathlib
from typing import Any

from muonq.errors import UserError


def special_ids(meta: dict[str, Any]) -> tuple[int | None, int | None]:
    """(bos, eos) for the HF config: the dataset's; without a BOS (byte-level BPE, GPT-2) the EOS
    doubles as BOS, GPT-2's convention."""
    eos = meta.get("eos_id")
    bos = meta.get("bos_id")
    return (bos if bos is not None else eos), eos


def hf_tokenizer(meta: dict[str, Any], folder: pathlib.Path) -> Any:
    """A transformers tokenizer that encodes text exactly as the data was encoded (no BOS/EOS added,
    special-token text kept as text)."""
    from muonq.data.tokenizers import BPE_FILE, _ByteLevelBPE, _HuggingFace, _SentencePiece, _Tiktoken, load_tokenizer

    spec = meta.get("tokenizer")
    if not spec:
        raise UserError(f"{folder}/meta.json does not name its tokenizer; pass tokenizer=none to export the model alone")
    tok = load_tokenizer(spec, folder=folder)
    bos, eos = special_ids(meta)
    if isinstance(tok, _HuggingFace):
        return tok.tokenizer
    if isinstance(tok, _ByteLevelBPE):
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / BPE_FILE), split_special_tokens=True)
        return _set_specials(hf, bos, eos)
    if isinstance(tok, _Tiktoken):
        return _tiktoken_gpt2(bos, eos)
    assert isinstance(tok, _SentencePiece), f"load_tokenizer returned a {type(tok).__name__} for {spec!r}"
    return _set_specials(_sentencepiece(tok.processor, spec), bos, eos)


def _set_specials(hf: Any, bos: int | None, eos: int | None) -> Any:
    kwargs = {}
    if eos is not None:
        kwargs["eos_token"] = hf.convert_ids_to_tokens(eos)
    if bos is not None:
        kwargs["bos_token"] = hf.convert_ids_to_tokens(bos)
    if kwargs:
        hf.add_special_tokens(kwargs)
    return hf


def _tiktoken_gpt2(bos: int | None, eos: int | None) -> Any:
    """GPT-2's vocabulary (the tiktoken file the data used) as a fast HF tokenizer."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from muonq.data import assets

    backend = TikTokenConverter(vocab_file=str(assets.gpt2_tiktoken_path()), pattern=r50k_pat_str, extra_special_tokens=["<|endoftext|>"]).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True)
    return _set_specials(hf, bos, eos)


def _sentencepiece(processor: Any, spec: str) -> Any:
    """A fast tokenizer with the SentencePiece BPE model's exact segmentation.

    transformers' own conversion (LlamaTokenizer) differs from SentencePiece on runs of spaces and
    on leading spaces: it ranks BPE merges by id where SentencePiece ranks by score (whitespace-only
    pieces come last), and it does not split words where SentencePiece does. Here the merges follow
    the scores, and a pre-tokenizer starts a word at the first space of each run, as SentencePiece
    does. It is saved as a generic fast tokenizer so that loading does not rebuild the pipeline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    p = processor
    if p.get_piece_size() and not any(p.is_byte(i) for i in range(min(p.get_piece_size(), 512))):
        raise UserError(f"{spec}: only SentencePiece BPE models with byte fallback (LLaMA layout) are converted")
    vocab = {p.id_to_piece(i): i for i in range(p.get_piece_size())}
    normal = [i for i in range(p.get_piece_size()) if not (p.is_unknown(i) or p.is_control(i) or p.is_byte(i))]
    merges = []
    for i in sorted(normal, key=lambda i: (-p.get_score(i), i)):
        piece = p.id_to_piece(i)
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(pairs, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    unk = p.id_to_piece(p.unk_id())
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = {"unk_token": unk}
    if p.bos_id() >= 0:
        specials["bos_token"] = p.id_to_piece(p.bos_id())
    if p.eos_id() >= 0:
        specials["eos_token"] = p.id_to_piece(p.eos_id())
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **specials)
