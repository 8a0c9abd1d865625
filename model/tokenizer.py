"""CLIP's byte-level BPE tokenizer with one extra special token, ``<|class|>``
(docs/reproduction.md §2).

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` is read from the installed OpenAI CLIP
distribution (PyPI ``clip-anytorch``, import name ``clip``) rather than kept in this repository.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

__all__ = ["Tokenizer", "SOT", "EOT", "CLASS", "CLASS_ID", "default_vocab_path"]

SOT, EOT, CLASS = "<|startoftext|>", "<|endoftext|>", "<|class|>"
CLASS_ID = 49408  # one past CLIP's 49,408 entries; its embedding row is appended at load time
N_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file


def default_vocab_path() -> Path:
    """The BPE file shipped inside the ``clip`` package, located without importing it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary comes from the 'clip-anytorch' package: "
                                "pip install clip-anytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed clip-anytorch package")
    return path


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters. Its order (printable
    bytes first, then the others) is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def clean(text: str) -> str:
    """ftfy fix, HTML unescape (twice), whitespace collapse, lower case, as OpenAI's tokenizer."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """Text -> CLIP token ids; ``tokenize`` pads to the context length like ``clip.tokenize``."""

    specials = {SOT: 49406, EOT: 49407, CLASS: CLASS_ID}
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|<\|class\|>|'s|'t|'re|'ve|'m|'ll|'d"
        r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    def __init__(self, vocab_path: str | Path | None = None):
        lines = gzip.open(vocab_path or default_vocab_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        self.byte_symbol = byte_symbols()
        symbols = list(self.byte_symbol.values())
        vocab = [*symbols, *(s + "</w>" for s in symbols),
                 *("".join(m) for m in merges)]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.encoder.update(self.specials)
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.bpe = lru_cache(maxsize=10_000)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(clean(text)):
            if token in self.specials:
                ids.append(self.specials[token])
                continue
            symbols = "".join(self.byte_symbol[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self.bpe(symbols))
        return ids

    def tokenize(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        """[N, context_length] int64: start token, BPE ids, end token, zero padding."""
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.specials[SOT], *self.encode(text), self.specials[EOT]]
            if len(ids) > context_length:
                raise ValueError(f"text {text!r} is {len(ids)} tokens, longer than the context "
                                 f"length {context_length}")
            out[row, :len(ids)] = torch.tensor(ids)
        return out
