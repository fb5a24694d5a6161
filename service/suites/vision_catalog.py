"""What the vision suites are made of: the font designs and their splits, the tasks in suite order, the characters
the backbone is pretrained on, and which suite holds which tasks. Data only: vision.py builds from it.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankmerge.service.suites.image_sources import FASHION_LABELS, FontFile, FontGroup

STYLES = ("serif", "sans", "mono")
DEJAVU = "fonts-dejavu-core fonts-dejavu-extra"
URW = "fonts-freefont-ttf fonts-urw-base35"
NOTO = "fonts-noto-core"

FONTS: dict[str, tuple[FontGroup, ...]] = {
    # fonts-dejavu-core only (present on a bare machine): too few designs to split by design, so split by file
    "core": (
        FontGroup("dejavu_sans", "sans", "train", "fonts-dejavu-core", ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")),
        FontGroup("dejavu_serif", "serif", "train", "fonts-dejavu-core", ("DejaVuSerif.ttf",)),
        FontGroup("dejavu_mono_bold", "mono", "train", "fonts-dejavu-core", ("DejaVuSansMono-Bold.ttf",)),
        FontGroup("dejavu_mono", "mono", "val", "fonts-dejavu-core", ("DejaVuSansMono.ttf",)),
        FontGroup("dejavu_serif_bold", "serif", "test", "fonts-dejavu-core", ("DejaVuSerif-Bold.ttf",)),
    ),
    # every split holds each style; every script task finds fonts in every split (Hebrew, Armenian and Georgian
    # through the Noto sans/serif designs and the URW/DejaVu ones)
    "full": (
        FontGroup("dejavu_sans", "sans", "train", DEJAVU, ("DejaVuSans.ttf", "DejaVuSans-Bold*.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed*.ttf")),
        FontGroup("dejavu_serif", "serif", "train", DEJAVU, ("DejaVuSerif.ttf", "DejaVuSerif-*.ttf", "DejaVuSerifCondensed*.ttf")),
        FontGroup("urw_sans", "sans", "train", URW, ("FreeSans*.ttf", "NimbusSans-*.otf", "NimbusSansNarrow-*.otf")),
        FontGroup("urw_roman", "serif", "train", URW, ("FreeSerif*.ttf", "NimbusRoman-*.otf")),
        FontGroup("urw_mono", "mono", "train", URW, ("FreeMono*.ttf", "NimbusMonoPS-*.otf")),
        FontGroup("liberation_sans", "sans", "train", "fonts-liberation", ("LiberationSans-*.ttf", "LiberationSansNarrow-*.ttf")),
        FontGroup("liberation_serif", "serif", "train", "fonts-liberation", ("LiberationSerif-*.ttf",)),
        FontGroup("bookman", "serif", "train", "fonts-urw-base35", ("URWBookman-*.otf",)),
        FontGroup("caladea", "serif", "train", "fonts-crosextra-caladea", ("Caladea-*.ttf",)),
        FontGroup("liberation_mono", "mono", "val", "fonts-liberation", ("LiberationMono-*.ttf",)),
        FontGroup("noto_sans", "sans", "val", NOTO, ("NotoSans-*.ttf", "NotoSansDisplay-*.ttf", "NotoSansHebrew-*.ttf", "NotoSansArmenian-*.ttf", "NotoSansGeorgian-*.ttf")),
        FontGroup("p052", "serif", "val", "fonts-urw-base35", ("P052-*.otf",)),
        FontGroup("dejavu_mono", "mono", "test", DEJAVU, ("DejaVuSansMono*.ttf",)),
        FontGroup("noto_serif", "serif", "test", NOTO, ("NotoSerif-*.ttf", "NotoSerifDisplay-*.ttf", "NotoSerifHebrew-*.ttf", "NotoSerifArmenian-*.ttf", "NotoSerifGeorgian-*.ttf")),
        FontGroup("c059", "serif", "test", "fonts-urw-base35", ("C059-*.otf",)),
        FontGroup("carlito", "sans", "test", "fonts-crosextra-carlito", ("Carlito-*.ttf",)),
        FontGroup("urw_gothic", "sans", "test", "fonts-urw-base35", ("URWGothic-*.otf",)),
        # scripts no task uses: pretraining only
        FontGroup("noto_scripts", "sans", "pretrain", NOTO, tuple(f"NotoSans{s}-*.ttf" for s in (
            "Devanagari", "Bengali", "Gujarati", "Tamil", "Thai", "Khmer", "Ethiopic", "Cherokee", "CanadianAboriginal",
            "Runic", "Tifinagh", "Arabic"))),
    ),
}


def _span(first: int, last: int) -> str:
    return "".join(chr(c) for c in range(first, last + 1))


DIGITS = string.digits
UPPER, LOWER = string.ascii_uppercase, string.ascii_lowercase
GREEK = _span(0x391, 0x3A1) + _span(0x3A3, 0x3A9)  # 24 capitals
CYRILLIC = _span(0x410, 0x42F)  # 32 capitals А–Я
HEBREW = _span(0x5D0, 0x5EA)  # 27 letters with final forms
ARMENIAN = _span(0x531, 0x556)  # 38 capitals
GEORGIAN = _span(0x10D0, 0x10F0)  # 33 Mkhedruli letters
MATH = "∑∏∫√∞≈≠≤≥±×÷∂∇∈∪∩⊂⊃∀∃¬∧∨"
# the script task leaves out letters that look alike across scripts (Latin lower case only; Α/А, Φ/Ф, … dropped)
SCRIPT_LETTERS = {"latin": LOWER, "greek": "ΓΔΘΛΞΠΣΨΩ", "cyrillic": "БДЖЗИЙЛУЦЧШЩЪЫЬЭЮЯ", "hebrew": HEBREW,
                  "armenian": ARMENIAN, "georgian": GEORGIAN}
TASK_CHARS = set(DIGITS + UPPER + LOWER + GREEK + CYRILLIC + HEBREW + ARMENIAN + GEORGIAN + MATH + string.punctuation)
PRETRAIN_CHARS = "".join(c for c in (
    _span(0x3B1, 0x3C9) + _span(0x430, 0x45F) + _span(0x561, 0x586) + "¢£¥€₹₽₩₪₫₴₺₦₱§¶©®°µ¿¡«»†‡•‰"
    + _span(0x2190, 0x21FF) + _span(0x2200, 0x22FF) + _span(0x2500, 0x257F) + _span(0x25A0, 0x25FF)
    + _span(0x905, 0x939) + _span(0x985, 0x9B9) + _span(0xA85, 0xAB9) + _span(0xB85, 0xBB9) + _span(0xE01, 0xE2E)
    + _span(0x1780, 0x17B3) + _span(0x1200, 0x1250) + _span(0x13A0, 0x13F4) + _span(0x1401, 0x1480)
    + _span(0x16A0, 0x16F0) + _span(0x2D30, 0x2D67) + _span(0x621, 0x64A)) if c not in TASK_CHARS)


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    labels: tuple[str, ...]  # class names; the class id is the index
    rule: str  # what the label is, for the manifest
    derived: bool = False  # a transform or coarsening of another task's data (at most a third of a suite)


@dataclass(frozen=True, kw_only=True)
class GlyphTask(Task):
    """Glyphs of `chars` in every font of a split that covers them; label_of(char, font) -> class id."""

    chars: str
    label_of: Callable[[str, FontFile], int]
    source: ClassVar[str] = "glyphs rendered from installed fonts"


@dataclass(frozen=True, kw_only=True)
class FashionTask(Task):
    of_class: Callable[[torch.Tensor], torch.Tensor] = lambda y: y
    invert: bool = False
    source: ClassVar[str] = "Fashion-MNIST"


@dataclass(frozen=True, kw_only=True)
class DigitsTask(Task):
    quarter_turns: int = 0
    source: ClassVar[str] = "sklearn.datasets.load_digits"


def _chars(name: str, chars: str, rule: str) -> GlyphTask:
    return GlyphTask(name=name, labels=tuple(chars), rule=rule, chars=chars, label_of=lambda c, f: chars.index(c))


COARSE = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # Fashion-MNIST class -> garment group
SCRIPT_OF = {c: i for i, letters in enumerate(SCRIPT_LETTERS.values()) for c in letters}
ALNUM = UPPER + LOWER + DIGITS

_ORDERED = (
    # vision8
    FashionTask(name="fashion", labels=FASHION_LABELS, rule="Fashion-MNIST class"),
    DigitsTask(name="digits", labels=tuple(DIGITS), rule="handwritten digit"),
    _chars("font_digits", DIGITS, "typeset digit"),
    _chars("upper", UPPER, "Latin capital letter"),
    _chars("lower", LOWER, "Latin small letter"),
    _chars("greek", GREEK, "Greek capital letter"),
    GlyphTask(name="font_style", labels=STYLES, rule="design class of the font of a letter or digit", chars=ALNUM,
              label_of=lambda c, f: STYLES.index(f.style)),
    FashionTask(name="fashion_coarse", labels=("upper-body", "dress-or-trouser", "footwear", "bag"),
                rule="garment group of the Fashion-MNIST class", of_class=lambda y: COARSE[y], derived=True),
    # vision14
    _chars("cyrillic", CYRILLIC, "Cyrillic capital letter"),
    _chars("punctuation", string.punctuation, "ASCII punctuation or symbol"),
    GlyphTask(name="weight", labels=("regular", "bold"), rule="bold (or demi) font of a letter or digit", chars=ALNUM,
              label_of=lambda c, f: int(f.bold)),
    GlyphTask(name="italic", labels=("upright", "italic"), rule="italic (or oblique) font of a letter or digit",
              chars=ALNUM, label_of=lambda c, f: int(f.italic)),
    _chars("math", MATH, "mathematical operator"),
    DigitsTask(name="digits_rot90", labels=tuple(DIGITS), rule="handwritten digit, image turned 90° counter-clockwise",
               quarter_turns=1, derived=True),
    # vision20
    _chars("hebrew", HEBREW, "Hebrew letter"),
    _chars("armenian", ARMENIAN, "Armenian capital letter"),
    _chars("georgian", GEORGIAN, "Georgian (Mkhedruli) letter"),
    GlyphTask(name="script", labels=tuple(SCRIPT_LETTERS), rule="script of a letter", chars="".join(SCRIPT_LETTERS.values()),
              label_of=lambda c, f: SCRIPT_OF[c], derived=True),
    FashionTask(name="fashion_inverted", labels=FASHION_LABELS, rule="Fashion-MNIST class, intensity inverted", invert=True,
                derived=True),
    GlyphTask(name="case", labels=("upper", "lower"), rule="case of a Latin letter", chars=UPPER + LOWER,
              label_of=lambda c, f: int(c.islower()), derived=True),
)
TASKS = {t.name: t for t in _ORDERED}
ORDER = [t.name for t in _ORDERED]
SUITES: dict[str, tuple[str, list[str]]] = {  # suite -> (scale, tasks); each suite a prefix of the next
    "vision-smoke": ("smoke", ["digits", "font_digits", "upper"]),
    "vision8": ("bench", ORDER[:8]),
    "vision14": ("bench", ORDER[:14]),
    "vision20": ("bench", ORDER[:20]),
    # not a prefix: five unlike questions on a backbone pretrained far from all of them (the AdaRank paper's regime)
    "shift5": ("shift", ["fashion", "digits", "upper", "greek", "cyrillic"]),
}
