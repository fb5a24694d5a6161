"""Real labelled text found offline on a Debian machine with the dev extras installed, one source per task.

Every source returns a class-balanced `LabelledTexts`: texts are whitespace-normalised and de-duplicated, a text seen
under two labels is dropped (its label would be a coin flip), and each class keeps at most `per_class` texts, drawn
with a seeded RNG from a sorted pool so the same machine always yields the same examples. A missing source raises
MergeInputError naming the command that installs it.

- sentiment:      VADER lexicon entries (words and idioms rated by 10 people) → sign of the mean rating.
- language:       sequences of frequent words from wordfreq's lists → their language (Latin-script languages only,
                  so the script gives nothing away; the uncased tokenizer also strips accents).
- docstring_area: docstrings of the Python standard library's own sources (read with ast, nothing imported) → the
                  library area of the package they live in.
- debian_section: Debian package short descriptions (`apt-cache dumpavail`) → the package's archive section.
- man_section:    man page NAME line plus the first DESCRIPTION paragraph (groff source) → the manual section.
"""

from __future__ import annotations

import ast
import gzip
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankmerge.workers.errors import MergeInputError

DEV_EXTRAS = "pip install -e '.[dev]'"


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[int]  # index into names
    names: tuple[str, ...]  # class names
    source: str  # where the text came from, for the manifest


def _normalise(text: str) -> str:
    return " ".join(text.split())


def balanced(pools: dict[str, Iterable[str]], per_class: int, seed: int, source: str, fix: str,
             minimum: int = 20) -> LabelledTexts:
    """At most per_class distinct texts per class, seeded; ambiguous texts dropped; classes keep their given order.
    A class with fewer than `minimum` texts means the source is missing or broken: MergeInputError with `fix`."""
    sets = {name: {_normalise(t) for t in pool} - {""} for name, pool in pools.items()}
    seen_twice = {t for a in sets for b in sets if a < b for t in sets[a] & sets[b]}
    rng = random.Random(f"{source}:{seed}")
    texts, labels = [], []
    for label, (name, pool) in enumerate(sets.items()):
        kept = sorted(pool - seen_twice)
        if len(kept) < minimum:
            raise MergeInputError(f"{source}: only {len(kept)} texts for class {name!r}", fix)
        chosen = rng.sample(kept, min(per_class, len(kept)))
        texts += chosen
        labels += [label] * len(chosen)
    return LabelledTexts(texts, labels, tuple(sets), source)


def _take(candidates: Iterable[str], per_class: int) -> list[str]:
    """The first per_class distinct texts of a lazily parsed pool (so only what is needed gets read)."""
    out: dict[str, None] = {}
    for text in candidates:
        out.setdefault(_normalise(text))
        if len(out) >= 2 * per_class:  # twice: room for the de-duplication across classes
            break
    return list(out)


def _pip(package: str) -> str:
    return f"pip install {package}  (or {DEV_EXTRAS})"


def _module_file(module: str, package: str) -> Path:
    """The folder of an installed PyPI package (its data files live there), or a MergeInputError naming the install."""
    from importlib.util import find_spec

    spec = find_spec(module)
    if spec is None or spec.origin is None:
        raise MergeInputError(f"the Python package {package!r} is not installed", _pip(package))
    return Path(spec.origin).parent


# ---- PyPI lexicons and word lists ------------------------------------------------------------------------------------
def sentiment(per_class: int, seed: int, min_rating: float = 1.0) -> LabelledTexts:
    """VADER entries whose mean rating is at least min_rating away from neutral; emoticons and symbols left out."""
    lexicon = _module_file("vaderSentiment", "vaderSentiment") / "vader_lexicon.txt"
    pools: dict[str, list[str]] = {"negative": [], "positive": []}
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        token, mean = line.split("\t")[:2]
        if re.fullmatch(r"[a-z][a-z' -]*", token) and abs(float(mean)) >= min_rating:
            pools["positive" if float(mean) > 0 else "negative"].append(token)
    return balanced(pools, per_class, seed, "vaderSentiment vader_lexicon.txt, sign of the mean rating", _pip("vaderSentiment"))


LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pt", "sv")


def language(per_class: int, seed: int, languages: tuple[str, ...] = LANGUAGES, words: int = 3, top: int = 2000) -> LabelledTexts:
    """Random sequences of `words` distinct words from each language's `top` most frequent alphabetic words."""
    _module_file("wordfreq", "wordfreq")
    from wordfreq import top_n_list

    rng = random.Random(f"language-words:{seed}")
    pools = {}
    for lang in languages:
        vocabulary = [w for w in top_n_list(lang, top) if w.isalpha()]
        pools[lang] = [" ".join(rng.sample(vocabulary, words)) for _ in range(2 * per_class)]
    fix = f"pip install --force-reinstall wordfreq (languages with word lists: {', '.join(LANGUAGES)}, …)"
    return balanced(pools, per_class, seed, f"wordfreq top-{top} word lists, {words}-word sequences", fix)


# ---- the Python standard library --------------------------------------------------------------------------------------
AREAS = {  # area -> stdlib packages; only packages every CPython 3.10+ ships as source
    "concurrency": ("asyncio", "multiprocessing", "concurrent"),
    "web": ("http", "urllib", "xmlrpc", "wsgiref"),
    "email": ("email",),
    "xml": ("xml",),
    "imports": ("importlib",),
    "logging": ("logging",),
    "testing": ("unittest",),
}


def _docstrings(package: Path) -> Iterator[str]:
    for path in sorted(package.rglob("*.py")):
        if {"test", "tests"} & set(path.relative_to(package).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 30:
                    yield doc


def docstring_area(per_class: int, seed: int, areas: tuple[str, ...] = tuple(AREAS)) -> LabelledTexts:
    """Docstrings (≥ 30 characters) of modules, classes and functions, labelled with their package's area."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pools = {area: [d for pkg in AREAS[area] if (stdlib / pkg).is_dir() for d in _docstrings(stdlib / pkg)] for area in areas}
    return balanced(pools, per_class, seed, f"docstrings of the Python {sysconfig.get_python_version()} standard library",
                    "use a Python whose standard library ships as .py sources (python.org, pyenv, or Debian's python3 packages)")


# ---- Debian -----------------------------------------------------------------------------------------------------------
SECTIONS = ("games", "science", "sound", "graphics", "net", "mail", "text", "video")


def debian_section(per_class: int, seed: int, sections: tuple[str, ...] = SECTIONS) -> LabelledTexts:
    """Short descriptions of every package in the apt lists, labelled with their section (contrib/, non-free/ dropped)."""
    fix = "run `apt-get update` (Debian or Ubuntu)"
    if shutil.which("apt-cache") is None:
        raise MergeInputError("apt-cache is not available: Debian package descriptions are a source of the text suite", fix)
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False).stdout
    pools: dict[str, list[str]] = {s: [] for s in sections}
    for stanza in dump.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        section = fields.get("Section", "").rsplit("/", 1)[-1]
        if section in pools and fields.get("Description"):
            pools[section].append(fields["Description"])
    if not any(pools.values()):
        raise MergeInputError("the apt package lists are empty", fix)
    return balanced(pools, per_class, seed, "apt-cache dumpavail short descriptions, package section", fix)


# ---- man pages --------------------------------------------------------------------------------------------------------
MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")
MAN_ROOT = Path("/usr/share/man")
_ESCAPES = re.compile(r"\\(f[BIRP]|f\(..|f\[[^]]*]|\(..|\[[^]]*]|\*\(..|\*\[[^]]*]|\*.|s[-+]?\d|&|\||\^|e|c)")
_HEADING = re.compile(r'^\.(?:SH|Sh)\s+"?([^"]*)"?\s*$')


def _groff_text(line: str) -> str:
    """The words of one groff line: font macros keep their arguments, other requests and escapes go."""
    if line.startswith((".\\\"", "'\\\"", '.\\"')):
        return ""
    if line.startswith((".", "'")):
        macro, _, rest = line[1:].partition(" ")
        if macro not in {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "Nm", "Nd", "Ar", "Fn", "Xr", "Em", "Sy", "Pa"}:
            return ""
        line = rest.replace('"', "")
    return _ESCAPES.sub(lambda m: "-" if m.group(0) == "\\-" else "", line.replace("\\-", "-"))


def man_page_text(path: Path) -> str:
    """NAME line plus the first DESCRIPTION paragraph of a (gzipped) groff man page; "" for aliases (.so) and oddities."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    lines = raw.decode("utf-8", "replace").splitlines()
    if any(line.startswith(".so ") for line in lines[:5]):
        return ""
    parts: dict[str, list[str]] = {"NAME": [], "DESCRIPTION": []}
    heading = None
    for line in lines:
        match = _HEADING.match(line)
        if match:
            heading = match.group(1).strip().upper()
            continue
        if heading == "DESCRIPTION" and line.startswith((".PP", ".P ", ".LP", ".Pp", ".TP", ".IP")) and parts["DESCRIPTION"]:
            heading = None  # first paragraph only
        elif heading in parts:
            parts[heading].append(_groff_text(line))
    name, description = _normalise(" ".join(parts["NAME"])), _normalise(" ".join(parts["DESCRIPTION"]))
    return f"{name}. {description}" if name and description else ""


def _diverse(files: list[Path], per_family: int) -> Iterator[Path]:
    """At most per_family pages per leading word of the name: one suite (gcloud: ~16,000 pages) must not be the class."""
    seen: dict[str, int] = {}
    for path in files:
        family = re.split(r"[_.:-]", path.name, maxsplit=1)[0].lower()
        seen[family] = seen.get(family, 0) + 1
        if seen[family] <= per_family:
            yield path


def man_section(per_class: int, seed: int, sections: tuple[str, ...] = MAN_SECTIONS, per_family: int = 5) -> LabelledTexts:
    """Pages drawn in a seeded order from /usr/share/man/man<section>, parsed until the class is full."""
    pools = {}
    for section in sections:
        files = sorted(p for p in (MAN_ROOT / f"man{section}").glob("*") if p.is_file() and not p.is_symlink())
        random.Random(f"man{section}:{seed}").shuffle(files)
        pools[section] = _take((man_page_text(f) for f in _diverse(files, per_family)), per_class)
    return balanced(pools, per_class, seed, "man pages under /usr/share/man: NAME and first DESCRIPTION paragraph, section",
                    "apt-get install -y man-db manpages manpages-dev (after removing any path-exclude of /usr/share/man "
                    "from /etc/dpkg/dpkg.cfg.d)")


SOURCES: dict[str, Callable[..., LabelledTexts]] = {
    "sentiment": sentiment,
    "language": language,
    "docstring_area": docstring_area,
    "debian_section": debian_section,
    "man_section": man_section,
}


def collect(source: str, per_class: int, seed: int, **options: Any) -> LabelledTexts:
    """The named source's balanced texts (options are the source function's keyword arguments)."""
    return SOURCES[source](per_class, seed, **options)
