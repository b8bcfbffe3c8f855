"""CLIP's byte-level BPE tokenizer, giving the same ids as OpenAI's for every string.

Text is repaired (ftfy), HTML-unescaped (twice, for doubly escaped entities), whitespace-collapsed and
lower-cased, split into words by a regular expression, and each word's UTF-8 bytes are merged by the
49,152 learned merges of `bpe_simple_vocab_16e6.txt.gz` (shipped beside this file, see its NOTICE).
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import regex as re

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # vocabulary = 256 bytes x 2 (word-final or not) + merges + 2 specials = 49408


@lru_cache()
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are shifted
    to code points from 256 on, so that BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Insertion order matters: the vocabulary lists the printable bytes first, then the shifted ones.
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text.strip()).strip().lower()


class SimpleTokenizer:
    # Words are runs of letters, single digits, runs of other non-space symbols, and English clitics.
    _word = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                       re.IGNORECASE)

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a version header
        symbols = list(byte_to_unicode().values())
        symbols += [s + "</w>" for s in symbols]  # the same byte at the end of a word
        symbols += ["".join(pair) for pair in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {u: b for b, u in self.byte_encoder.items()}
        self.cache = {SOT: SOT, EOT: EOT}

    def bpe(self, token: str) -> str:
        """Merge the characters of one word, lowest-ranked pair first, until no known pair is left."""
        if token in self.cache:
            return self.cache[token]
        parts = list(token[:-1]) + [token[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = " ".join(parts)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self._word.findall(clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word).split(" "))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")
