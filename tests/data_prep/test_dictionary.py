"""Dictionary conventions of XLM-R/fairseq, checked against HF's XLMRobertaTokenizer."""
import json
import lzma
import shutil

import numpy as np
import pytest

from data_prep.dictionary import Dictionary
from tests.conftest import SAMPLE_CORPUS


@pytest.fixture(scope="module")
def dictionary(prepared_data):
    return Dictionary(prepared_data / "vocab" / "spm.model")


def multilingual_lines(per_lang=15):
    lines = []
    for lang in ["en", "de", "ja", "zh-Hans", "ru", "uk", "el", "ko", "vi", "tr", "mk"]:
        with lzma.open(SAMPLE_CORPUS / f"{lang}.txt.xz", "rt", encoding="utf-8") as f:
            lines += [line.strip() for _, line in zip(range(per_lang), f) if line.strip()]
    return lines + ["emoji 🙂 and a snowman ☃ and 𝄞", "    spaces   and\ttabs "]


def test_special_ids(dictionary, prepared_data):
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    sp = dictionary.sp
    assert [dictionary.piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert dictionary.mask == dictionary.size - 1 == sp.get_piece_size() + 1
    assert dictionary.piece(dictionary.mask) == "<mask>"
    # SentencePiece keeps its defaults: unk 0, bos 1, eos 2; piece p -> p + 1
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert dictionary.piece(sp.get_piece_size()) == sp.id_to_piece(sp.get_piece_size() - 1)
    assert manifest["vocab"]["special_ids"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": dictionary.mask}
    assert manifest["vocab"]["size"] == dictionary.size == 2002


def test_hf_xlmr_tokenizer_gives_the_same_ids(dictionary, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(dictionary.spm_path, tmp_path / "sentencepiece.bpe.model")
    hf = transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == dictionary.size
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (
        0, 1, 2, 3, dictionary.mask)
    lines = multilingual_lines()
    ours = [ids.tolist() for ids in dictionary.encode_lines(lines)]
    theirs = hf(lines, add_special_tokens=False)["input_ids"]
    assert ours == theirs
    # and with specials: <s> ... </s> as XLM-R's fine-tuning inputs
    assert hf(lines[:1])["input_ids"][0] == [0, *ours[0], 2]


def test_dtype_follows_vocabulary_size(dictionary):
    assert dictionary.dtype == np.uint16  # 2002 ids fit in 16 bits
