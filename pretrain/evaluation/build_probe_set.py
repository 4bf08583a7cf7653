"""Builds the bundled cross-lingual probe set (pretrain/evaluation/probe_set/) from the
human translations in a Debian system's gettext catalogs (/usr/share/locale/*/LC_MESSAGES/*.mo:
msgid the English message, msgstr its translation).

    python -m pretrain.evaluation.build_probe_set [--locale-dir /usr/share/locale]
        [--out pretrain/evaluation/probe_set] [--exclude-corpus DIR ...] [--pairs 1000]

Writes the layouts `pretrain.evaluation.probes` reads (README "Cross-lingual probes"):
retrieval/LANG.tsv.xz (English TAB translation) for the languages of the bundled sample, and
transfer/{train,test}.tsv.xz (text TAB label TAB language) where the label is the software domain
of the catalog a message comes from; plus manifest.json with every count and source. The
choices (which messages are junk, how languages map to locales, how train and test are kept
apart, decontamination) are documented in probe_set/README.md. The output is a function of the
catalogs and the arguments only: no randomness, selection orders by a hash of the message.
"""
from __future__ import annotations

import argparse
import collections
import gettext
import hashlib
import json
import lzma
import re
import unicodedata
from pathlib import Path
from typing import Iterator, Optional

from data_prep.atomic import write_json

# The languages of data_prep/sample_corpus -> the locale dirs whose catalogs translate into
# them, in order of preference (the first dir that has a message wins). The sample's pt
# (manpages-l10n pt_BR: "arquivo") is Brazilian, its no Bokmål ("Vis denne hjelpeteksten"),
# its sr Cyrillic; sr@latin, nn, pt (European) and zh_HK are other written standards: unused.
LOCALES = {
    "cs": ["cs"], "da": ["da"], "de": ["de"], "el": ["el"], "es": ["es"], "fi": ["fi"], "fr": ["fr"],
    "hr": ["hr"], "hu": ["hu"], "id": ["id"], "it": ["it"], "ja": ["ja"], "ko": ["ko"], "mk": ["mk"],
    "nl": ["nl"], "no": ["nb", "no"], "pl": ["pl"], "pt": ["pt_BR"], "ro": ["ro"], "ru": ["ru"],
    "sl": ["sl"], "sr": ["sr"], "sv": ["sv"], "tr": ["tr"], "uk": ["uk"], "vi": ["vi"],
    "zh-Hans": ["zh_CN"], "zh-Hant": ["zh_TW"],
}
# Scripts other than Latin: a translation must be mostly in its own script (not left in English).
NON_LATIN = {"el", "ja", "ko", "mk", "ru", "sr", "uk", "zh-Hans", "zh-Hant"}

# The transfer task's labels: the software domain of a catalog. Catalogs not listed (ISO code
# lists, MIME types, keyboard layouts, the C library, ...) give retrieval pairs only.
DOMAINS = {
    "packages": ["apt", "libapt-pkg6.0", "dpkg", "dpkg-dev", "PackageKit", "appstream", "python-apt",
                 "software-properties", "adduser"],
    "database": ["postgres-15", "psql-15", "initdb-15", "libpq5-15", "pgscripts-15", "plpgsql-15", "pg_amcheck-15",
                 "pg_archivecleanup-15", "pg_basebackup-15", "pg_checksums-15", "pg_config-15", "pg_controldata-15",
                 "pg_ctl-15", "pg_dump-15", "pg_resetwal-15", "pg_rewind-15", "pg_test_fsync-15",
                 "pg_test_timing-15", "pg_upgrade-15", "pg_verifybackup-15", "pg_waldump-15"],
    "version-control": ["git"],
    "security": ["gnupg2", "gnutls30", "mit-krb5", "Linux-PAM", "polkit-1", "shadow"],
    "desktop": ["gtk20", "gtk20-properties", "glib20", "gdk-pixbuf", "at-spi2-core", "gsettings-desktop-schemas",
                "gstreamer-1.0"],
    "toolchain": ["ld", "gold", "gas", "bfd", "binutils", "opcodes", "gprof", "elfutils", "make", "gettext-tools"],
}
CATALOG_DOMAIN = {catalog: domain for domain, catalogs in DOMAINS.items() for catalog in catalogs}
NAME_LISTS = re.compile(r"^iso_")  # country, language, currency and script names: not sentences

MIN_WORDS = 4  # English words: shorter messages ("Open File") are labels, not sentences
MIN_CHARS = 20
MAX_CHARS = 200
# Placeholders and machine text, which would let a model match a pair by copying rather than
# by meaning: printf/Python/shell formats, markup, options, paths, URLs, addresses.
MACHINE_TEXT = re.compile(r"%|\{|\}|\$|<[^>]*>|&\w+;|--|\\|`|https?:|www\.|@|(^|\s)[/~]\w|\w/\w|\t|\b[A-Z_]{2,}\b")
MNEMONIC = re.compile(r"\s*\(_[A-Za-z0-9]\)|_(?=\w)")  # GTK accelerators: "_Open", "打开(_O)"
SHINGLE = 20  # characters; a message with half of its shingles in an excluded corpus is "seen"


def read_catalog(path: Path) -> Optional[dict]:
    """msgid -> msgstr of one .mo file; None where Python's gettext cannot read it (a catalog
    in a legacy 8-bit charset)."""
    try:
        with open(path, "rb") as f:
            return gettext.GNUTranslations(f)._catalog
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def clean(text: str) -> str:
    text = MNEMONIC.sub("", unicodedata.normalize("NFC", text))
    return " ".join(text.split())


def junk_reason(english: str, translation: str, lang: str) -> Optional[str]:
    """Why a (msgid, msgstr) entry is no probe sentence, or None."""
    if "\n" in english.strip() or "\n" in translation.strip():
        return "multi-line"
    en, xx = clean(english), clean(translation)
    if not xx:
        return "untranslated"
    if MACHINE_TEXT.search(en) or MACHINE_TEXT.search(xx):
        return "format or machine text"
    if len(en.split()) < MIN_WORDS or len(en) < MIN_CHARS:
        return "too short"
    if len(en) > MAX_CHARS or len(xx) > 2 * MAX_CHARS:
        return "too long"
    if _words(en) == _words(xx):
        return "identical to English"
    if lang in NON_LATIN:
        letters = [c for c in xx if c.isalpha()]
        if sum(c.isascii() for c in letters) > len(letters) / 2:
            return "not in the language's script"
    if _words(en) & _words(xx):
        return "shares a word with English"  # names, cognates, untranslated terms: matchable by copying
    return None


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) >= 3}


def entries(locale_root: Path, locale: str, skipped: collections.Counter) -> Iterator[tuple[str, str, str]]:
    """(catalog, msgid, msgstr) of a locale's catalogs, in catalog-name order; plural forms
    (tuple keys), context entries (msgctxt\\x04msgid) and the header are left out."""
    for path in sorted((locale_root / locale / "LC_MESSAGES").glob("*.mo")):
        if NAME_LISTS.match(path.stem):
            continue
        catalog = read_catalog(path)
        if catalog is None:
            skipped[f"unreadable catalog {locale}/{path.name}"] += 1
            continue
        for msgid, msgstr in catalog.items():
            if not isinstance(msgid, str):
                skipped["plural form"] += 1
            elif "\x04" in msgid:
                skipped["context entry"] += 1
            elif msgid:
                yield path.stem, msgid, msgstr


def collect(locale_root: Path) -> tuple[dict, dict, dict, dict]:
    """Per language {English: translation} of the clean entries, the counts of what was left
    out and the catalogs read; and {English: every catalog that holds it, in any language}."""
    pairs, report, catalogs = {}, {}, {}
    sources: dict[str, set[str]] = collections.defaultdict(set)
    for lang, locales in LOCALES.items():
        skipped = collections.Counter()
        found: dict[str, str] = {}
        used = set()
        for locale in locales:
            for catalog, msgid, msgstr in entries(locale_root, locale, skipped):
                sources[clean(msgid)].add(catalog)
                reason = junk_reason(msgid, msgstr, lang)
                if reason:
                    skipped[reason] += 1
                    continue
                en = clean(msgid)
                if en in found:
                    skipped["English seen in another catalog"] += 1
                    continue
                found[en] = clean(msgstr)
                used.add(f"{locale}/{catalog}")
        # Two English messages with one translation would make retrieval ambiguous.
        by_translation = collections.Counter(found.values())
        for en in [en for en, xx in found.items() if by_translation[xx] > 1]:
            del found[en]
            skipped["translation shared by several messages"] += 1
        pairs[lang], report[lang], catalogs[lang] = found, skipped, sorted(used)
    return pairs, report, catalogs, sources


def order_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- decontamination: what the pretraining corpus already holds ------------------------


def corpus_shingles(path: Path, wanted: set[str]) -> set[str]:
    """The shingles of `wanted` that occur in one CC100-layout file (LANG.txt.xz)."""
    found = set()
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = " ".join(line.split()).lower()
            found.update(s for s in (line[i:i + SHINGLE] for i in range(max(1, len(line) - SHINGLE + 1))) if s in wanted)
    return found


def shingles(text: str) -> list[str]:
    text = text.lower()
    return [text[i:i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))]


def seen_in(texts: list[str], corpus_file: Path) -> set[str]:
    """The texts half or more of whose shingles occur in corpus_file (missing: none)."""
    if not corpus_file.is_file():
        return set()
    wanted = {s for t in texts for s in shingles(t)}
    found = corpus_shingles(corpus_file, wanted)
    return {t for t in texts if 2 * sum(s in found for s in shingles(t)) >= len(shingles(t))}


def decontaminate(pairs: dict, corpora: list[Path], report: dict) -> None:
    """Drops every pair whose English side is seen in a corpus's en file or whose translation
    is seen in its file of the language."""
    for corpus in corpora:
        english = sorted({en for found in pairs.values() for en in found})
        seen_en = seen_in(english, corpus / "en.txt.xz")
        for lang, found in pairs.items():
            seen_xx = seen_in(sorted(found.values()), corpus / f"{lang}.txt.xz")
            for en in [en for en, xx in found.items() if en in seen_en or xx in seen_xx]:
                del found[en]
                report[lang][f"seen in {corpus.name}"] += 1


# ---- the two probe sets ---------------------------------------------------------------


def retrieval_pairs(pairs: dict, per_language: int, exclude: set[str]) -> dict[str, list[tuple[str, str]]]:
    """Up to per_language pairs per language, English messages shared by many languages first
    (one English embedding serves them all), ties in hash order."""
    coverage = collections.Counter(en for found in pairs.values() for en in found)
    rank = sorted(coverage, key=lambda en: (-coverage[en], order_key(en)))
    out = {}
    for lang, found in pairs.items():
        chosen = [en for en in rank if en in found and en not in exclude][:per_language]
        out[lang] = [(en, found[en]) for en in sorted(chosen, key=order_key)]
    return out


def transfer_task(pairs: dict, sources: dict, train_per_label: int, test_per_label: int) -> tuple[list, list, set[str]]:
    """English training messages and multilingual test messages, labelled by domain.

    A message is labelled only where every catalog that holds it (in any language) is of one
    domain ("Invalid argument" in git and GnuPG is neither's); messages are split by their skeleton (lowercase letters only) so that no test
    message is a variant of a training one ("Cannot open file." / "cannot open file"). Test
    messages are those translated into the most languages; training messages are English only.
    """
    domain_of = {en: {CATALOG_DOMAIN.get(catalog, "") for catalog in sources[en]}
                 for found in pairs.values() for en in found}
    labelled = {en: d.pop() for en, d in domain_of.items() if len(d) == 1 and "" not in d}
    coverage = collections.Counter(en for found in pairs.values() for en in found if en in labelled)
    train, test = [], []
    for label in DOMAINS:
        messages = [en for en in labelled if labelled[en] == label]
        # The best-covered skeletons go to test, the rest (in hash order) to train.
        skeletons = collections.defaultdict(list)
        for en in messages:
            skeletons[_skeleton(en)].append(en)
        by_coverage = sorted(skeletons, key=lambda s: (-max(coverage[en] for en in skeletons[s]), order_key(s)))
        test_skeletons = by_coverage[:test_per_label]
        train_skeletons = sorted(by_coverage[test_per_label:], key=order_key)[:train_per_label]
        test += [(en, label) for s in test_skeletons for en in skeletons[s][:1]]
        train += [(en, label) for s in train_skeletons for en in skeletons[s][:1]]
    test_rows = [(en, label, "en") for en, label in test]
    for lang, found in pairs.items():
        test_rows += [(found[en], label, lang) for en, label in test if en in found]
    return [(en, label, "en") for en, label in train], test_rows, {en for en, _ in train + test}


def _skeleton(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalpha())


def write_tsv(path: Path, rows: list[tuple]) -> None:
    """xz-compressed TSV (4x smaller: the set stays under 2 MB with 1000 pairs per language)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as f:
        f.writelines("\t".join(row) + "\n" for row in rows)
    tmp.replace(path)


def build(locale_root: Path, out: Path, corpora: list[Path], per_language: int, train_per_label: int,
          test_per_label: int) -> dict:
    pairs, report, catalogs, sources = collect(locale_root)
    decontaminate(pairs, corpora, report)
    train, test, transfer_messages = transfer_task(pairs, sources, train_per_label, test_per_label)
    # The transfer task's messages stay out of retrieval: one probe's data is not the other's.
    retrieval = retrieval_pairs(pairs, per_language, transfer_messages)
    for lang, rows in retrieval.items():
        write_tsv(out / "retrieval" / f"{lang}.tsv.xz", rows)
    write_tsv(out / "transfer" / "train.tsv.xz", train)
    write_tsv(out / "transfer" / "test.tsv.xz", test)
    test_counts = collections.Counter(lang for _, _, lang in test)
    manifest = {
        "format": "xlmr-probe-set", "version": 1,
        "built_by": "python -m pretrain.evaluation.build_probe_set", "locale_dir": str(locale_root),
        "excluded_corpora": [str(c) for c in corpora], "locales": LOCALES, "domains": DOMAINS,
        "retrieval": {lang: len(rows) for lang, rows in retrieval.items()},
        "transfer": {"train": dict(collections.Counter(label for _, label, _ in train)),
                     "test_messages": dict(collections.Counter(label for _, label, lang in test if lang == "en")),
                     "test_rows_per_language": dict(test_counts)},
        "clean_pairs": {lang: len(found) for lang, found in pairs.items()},
        "left_out": {lang: dict(sorted(c.items())) for lang, c in report.items()},
        "catalogs": catalogs,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="build_probe_set", description=__doc__.split("\n\n")[0])
    p.add_argument("--locale-dir", type=Path, default=Path("/usr/share/locale"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "probe_set")
    p.add_argument("--exclude-corpus", type=Path, action="append", default=[],
                   help="a CC100-layout corpus dir (LANG.txt.xz): pairs it already holds are left out (repeatable)")
    p.add_argument("--pairs", type=int, default=1000, help="retrieval pairs per language (default 1000)")
    p.add_argument("--train-per-label", type=int, default=150)
    p.add_argument("--test-per-label", type=int, default=50)
    args = p.parse_args(argv)
    manifest = build(args.locale_dir, args.out, args.exclude_corpus, args.pairs, args.train_per_label,
                     args.test_per_label)
    print(json.dumps({k: manifest[k] for k in ("retrieval", "transfer")}, indent=1))


if __name__ == "__main__":
    main()
