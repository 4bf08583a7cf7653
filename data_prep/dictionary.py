"""The model vocabulary: XLM-R/fairseq dictionary conventions on top of a SentencePiece model.

    id 0 <s>   1 <pad>   2 </s>   3 <unk>   4.. SentencePiece pieces   last <mask>

The SentencePiece model keeps its own default ids (unk 0, bos 1, eos 2, pieces from 3), mapped
with fairseq's offset of 1: piece p -> p + 1, and SentencePiece's unk 0 -> 3. This is exactly
what HF `XLMRobertaTokenizer` does with a `sentencepiece.bpe.model`, so a model trained here
can be exported and used with it. Vocabulary size = SentencePiece size + 2 (<pad>, <mask>).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import sentencepiece as spm

from .errors import PrepError

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
FAIRSEQ_OFFSET = 1


class Dictionary:
    def __init__(self, spm_path: Path):
        self.spm_path = Path(spm_path)
        # One thread: the prep parallelizes over processes (SentencePiece would take every core).
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_path), num_threads=1)
        if (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (0, 1, 2):
            raise PrepError(
                f"{spm_path}: SentencePiece ids unk/bos/eos are {self.sp.unk_id()}/{self.sp.bos_id()}/"
                f"{self.sp.eos_id()}; the XLM-R dictionary needs the defaults 0/1/2"
            )
        self.spm_size = self.sp.get_piece_size()
        self.mask = self.spm_size + FAIRSEQ_OFFSET
        self.size = self.spm_size + 2
        self.dtype = np.uint16 if self.size <= np.iinfo(np.uint16).max + 1 else np.uint32

    @property
    def special_ids(self) -> dict:
        return {"bos": BOS, "pad": PAD, "eos": EOS, "unk": UNK, "mask": self.mask}

    def to_dict_ids(self, spm_ids: np.ndarray) -> np.ndarray:
        """SentencePiece ids -> dictionary ids (vectorized)."""
        ids = spm_ids.astype(np.int64) + FAIRSEQ_OFFSET
        ids[spm_ids == self.sp.unk_id()] = UNK
        return ids

    def encode_lines(self, lines: Sequence[str]) -> List[np.ndarray]:
        """Dictionary ids of each line, without specials (for tests and tools)."""
        return [self.to_dict_ids(np.asarray(ids, dtype=np.int64)) for ids in self.sp.encode(list(lines))]

    def piece(self, dict_id: int) -> str:
        if dict_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[dict_id]
        if dict_id == self.mask:
            return "<mask>"
        return self.sp.id_to_piece(dict_id - FAIRSEQ_OFFSET)
