"""RoBERTa "full sentences" packing of a token stream into fixed-length sequences.

The stream of a language (one split of one encode chunk) is its documents in order; a
document is each paragraph's tokens followed by `</s>`, then one more `</s>`:

    p1 </s> p2 </s> </s> q1 </s> ...        (p*, q*: paragraphs of two documents)

which is fairseq's layout for RoBERTa/XLM-R pretraining data (one `</s>` ending every line, an
empty line between documents). The stream is cut into blocks of seq_len - 1 tokens, each
prefixed with `<s>`, so sequences cross paragraph and document boundaries and carry no
padding. Only the last sequence of a stream can be shorter (at least 2 tokens).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .dictionary import BOS


class SequencePacker:
    def __init__(self, seq_len: int, dtype):
        if seq_len < 2:
            raise ValueError(f"pack.seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.block = seq_len - 1
        self.dtype = dtype
        self._pending: List[np.ndarray] = []
        self._n_pending = 0

    def add(self, tokens: np.ndarray) -> Optional[np.ndarray]:
        """Append stream tokens; returns the completed sequences as a [n, seq_len] array, or None."""
        if len(tokens) == 0:
            return None
        self._pending.append(tokens)
        self._n_pending += len(tokens)
        if self._n_pending < self.block:
            return None
        stream = np.concatenate(self._pending)
        n_full = len(stream) // self.block
        rest = stream[n_full * self.block:]
        self._pending, self._n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        out = np.empty((n_full, self.seq_len), dtype=self.dtype)
        out[:, 0] = BOS
        out[:, 1:] = stream[: n_full * self.block].reshape(n_full, self.block)
        return out

    def finish(self) -> Optional[np.ndarray]:
        """The remainder of the stream as one shorter sequence, or None."""
        if not self._n_pending:
            return None
        rest = np.concatenate(self._pending)
        self._pending, self._n_pending = [], 0
        out = np.empty(len(rest) + 1, dtype=self.dtype)
        out[0] = BOS
        out[1:] = rest
        return out
