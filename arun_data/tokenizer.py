"""
Tokenizer training: BPE learned with rustbpe from the training documents, saved as a
tiktoken Encoding, plus the UTF-8 byte length of every token that val_bpb divides by.
Loading and using a prepared tokenizer is runtime work: prepare.Tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import rustbpe
import tiktoken

from prepare import SPECIAL_TOKENS

# GPT-4 style split with \p{N}{1,2} instead of {1,3}, as upstream.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
DOC_CHAR_CAP = 10_000          # documents are capped at this many chars for tokenizer training only


def train_tokenizer(docs: Iterable[str], vocab_size: int, max_chars: int) -> tiktoken.Encoding:
    """BPE with rustbpe, returned as a tiktoken Encoding with our special tokens appended."""

    def capped() -> Iterator[str]:
        n = 0
        for doc in docs:
            doc = doc[:DOC_CHAR_CAP]
            n += len(doc)
            yield doc
            if n >= max_chars:
                return

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(capped(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="arun-bpe", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 byte length of each token; 0 for special tokens so the metric skips them."""
    out = np.zeros(enc.n_vocab, dtype=np.int32)
    special = set(enc.special_tokens_set)
    for i in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(i)
        out[i] = 0 if b.decode("utf-8", errors="replace") in special else len(b)
    return out
