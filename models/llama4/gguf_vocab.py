"""A GGUF file's tokenizer.* metadata -> a `tokenizers` backend that tokenizes as llama.cpp does
(its pre-tokenizer table, token types, byte-level and sentencepiece vocabularies)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from models.errors import CheckpointError

# llama.cpp's token types (tokenizer.ggml.token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, named by tokenizer.ggml.pre. These are the regexes of the original
# tokenizer.json files; llama.cpp (llama-vocab.cpp) keeps them as comments beside its std::regex
# rewrites, and applies its regex list in sequence, each splitting the pieces of the previous one.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPACE = "\u2581"  # sentencepiece's visible space
_DIGIT = r"\p{N}"  # llama.cpp's first regex for starcoder-style vocabularies: every digit alone
# pre name -> (regexes in order, ignore_merges, default add_bos), as llama-vocab.cpp sets them.
_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _entry in (
    ("default", ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False)),
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum jina-v1-en "
     "jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4", ((_GPT2,), False, False)),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b", ((_DIGIT, _GPT2), False, False)),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", ((_LLAMA3,), True, True)),
    ("dbrx smaug-bpe", ((_LLAMA3,), False, False)),
    ("qwen2 deepseek-r1-qwen kormo megrez stablelm2 hunyuan", ((_QWEN2,), False, False)),
    ("gpt-4o llama4 minimax-m2 kanana2 talkie", ((_GPT4O,), False, False)),
    ("tekken", ((_TEKKEN,), True, True)),
):
    _PRE.update(dict.fromkeys(_names.split(), _entry))


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, which byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling



def gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer.* keys of a GGUF file, read straight from its key/value section.

    Not GGUFReader: it builds a numpy view for every element of every array, which takes seconds
    for a 50k-token vocabulary; this walk takes a tenth of that and never touches the tensors.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            meta = _GGUFKeyValues(buf).read()
    except (OSError, struct.error, ValueError, KeyError) as e:  # empty or truncated, unknown type, bad UTF-8
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from None
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


class _GGUFKeyValues:
    """A cursor over a GGUF header and its key/value pairs (the format's spec, nothing more)."""

    def __init__(self, buf: mmap.mmap) -> None:
        from gguf import GGUF_MAGIC, GGUFValueType  # noqa: PLC0415 - only GGUF users pay for it

        self._magic, self._T = GGUF_MAGIC, GGUFValueType
        T = GGUFValueType
        self._scalar = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I",
                        T.INT32: "i", T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q",
                        T.FLOAT64: "d"}
        self._buf, self._pos, self._order = buf, 0, "<"

    def read(self) -> dict[str, Any]:
        if self._take("I") != self._magic:
            raise ValueError("bad magic, expected 'GGUF'")
        if self._take("I") > 0xFFFF:  # a big-endian file reads its small version number byte-swapped
            self._order = ">"
        _n_tensors, n_kv = self._take("Q"), self._take("Q")
        return {self._string(): self._value(self._take("I")) for _ in range(n_kv)}

    def _take(self, fmt: str) -> Any:
        fmt = self._order + fmt
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def _string(self) -> str:
        n = self._take("Q")
        self._pos += n
        return self._buf[self._pos - n:self._pos].decode("utf-8")

    def _value(self, kind: int) -> Any:
        T = self._T
        if kind == T.STRING:
            return self._string()
        if kind == T.ARRAY:
            item_kind, count = self._take("I"), self._take("Q")
            if item_kind in self._scalar:  # numbers in one unpack: 50k scores or types at C speed
                items = self._take(f"{count}{self._scalar[T(item_kind)]}")
                return list(items) if count != 1 else [items]
            return [self._value(item_kind) for _ in range(count)]
        return self._take(self._scalar[T(kind)])


def _split_merges(path: Path, merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        pairs.append((left, right))
    return pairs


def _bpe(path: Path, vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> Backend:
    try:
        return Backend(BPE(vocab, merges, **options))
    except Exception as e:  # tokenizers reports e.g. a merge of tokens missing from the vocabulary
        message = f"{path}: the GGUF vocabulary and merges do not form a BPE model: {e}"
        raise CheckpointError(message) from None


def _add_typed_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    # llama.cpp matches control and unknown tokens in text as specials, and user-defined ones
    # always, but decodes user-defined ones as text: special vs plain added tokens here.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])


def byte_level_backend(path: Path, tokens: list[str], types: list[int], merges: list[str] | None,
                        pre: str) -> tuple[Backend, bool]:
    """tokenizer.ggml.model 'gpt2'; returns the backend and llama.cpp's default for add_bos."""
    if pre not in _PRE:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer herd knows "
                              f"(known: {', '.join(sorted(_PRE))})")
    if merges is None:
        raise CheckpointError(f"{path}: byte-level BPE vocabulary without tokenizer.ggml.merges")
    regexes, ignore_merges, add_bos = _PRE[pre]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Control and user-defined tokens are stored as their text; a normal token outside the
        # byte alphabet is a converter slip, respelled so BPE can reach it.
        if ty not in (_CONTROL, _USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    backend = _bpe(path, vocab, _split_merges(path, merges), ignore_merges=ignore_merges)
    if regexes == (_GPT2,):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif regexes == (_DIGIT, _GPT2):
        # The form the original tokenizer.json of these models has (SmolLM2, StarCoder): the same
        # splits as llama.cpp's ["\p{N}", gpt2] regex pair.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, types)
    return backend, add_bos


def sentencepiece_backend(path: Path, tokens: list[str], types: list[int], scores: list[float] | None,
                           merges: list[str] | None, add_space_prefix: bool) -> Backend:
    """tokenizer.ggml.model 'llama': sentencepiece BPE with byte fallback, as llama.cpp runs it."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if merges is not None:
        pairs = _split_merges(path, merges)
    elif scores is not None and len(scores) == len(tokens):
        # llama.cpp merges the adjacent pair whose joined piece scores highest; BPE merges ranked
        # by that score make the same choices.
        ranked = []
        for t, ty, score in zip(tokens, types, scores):
            if ty in (1, _USER_DEFINED):
                ranked += [(-score, vocab[t[:k]], vocab[t[k:]], t[:k], t[k:])
                           for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        pairs = [(left, right) for *_, left, right in sorted(ranked)]
    else:
        raise CheckpointError(f"{path}: sentencepiece vocabulary without tokenizer.ggml.merges "
                              "or one tokenizer.ggml.scores entry per token")
    unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
    backend = _bpe(path, vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    # llama.cpp prefixes a space to every text fragment that follows a special token (or starts
    # the text); a normalizer runs per fragment between added tokens, so Prepend does the same.
    # (Metaspace's prepend_scheme="first" would not, and skips text already starting with a space.)
    prefix = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    _add_typed_tokens(backend, tokens, types)
    return backend


# ---- streaming -----------------------------------------------------------------------------------

