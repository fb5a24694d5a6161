"""Raw images for the vision suites, all from files a machine has offline: Fashion-MNIST (Debian
`dataset-fashion-mnist`), scikit-learn's handwritten digits, and glyphs rendered with Pillow from installed fonts.

Every loader returns grey images in [0, 1] as float32 [N, H, W]; `resize` brings them to the suites' common size.
A missing source raises MergeInputError naming the one apt-get command that installs it, before any heavy work.
"""

from __future__ import annotations

import fnmatch
import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.nn.functional import interpolate

from rankmerge.workers.errors import MergeInputError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package puts it
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
MISSING_GLYPH = "\U000f0000"  # a private-use code point no text font maps: renders as the font's .notdef glyph


def install_fix(packages: Iterable[str]) -> str:
    return f"install once: apt-get update && apt-get install -y {' '.join(sorted(set(packages)))}"


def _read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (gzip): big-endian dims after a 4-byte magic whose last byte is the rank."""
    raw = gzip.open(path).read()
    rank = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=rank, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def load_fashion_mnist(directory: Path = FASHION_DIR) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": 60,000 images, "t10k": 10,000}: images float32 [N, 28, 28] in [0, 1], labels int64 [N]."""
    files = {part: (directory / f"{part}-images-idx3-ubyte.gz", directory / f"{part}-labels-idx1-ubyte.gz")
             for part in ("train", "t10k")}
    if not all(p.is_file() for pair in files.values() for p in pair):
        raise MergeInputError(f"Fashion-MNIST is not installed (no idx files in {directory})", install_fix([FASHION_PACKAGE]))
    return {part: (torch.from_numpy(_read_idx(images).astype(np.float32) / 255.0),
                   torch.from_numpy(_read_idx(labels).astype(np.int64))) for part, (images, labels) in files.items()}


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: images float32 [N, 8, 8] in [0, 1], digits int64 [N]."""
    from sklearn.datasets import load_digits  # imported only when a suite is actually built

    raw = load_digits()
    return torch.tensor(raw.images, dtype=torch.float32) / 16.0, torch.as_tensor(raw.target, dtype=torch.int64)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] -> [N, size, size], antialiased, so 28×28 and 8×8 sources meet the rendered glyphs at one size."""
    if images.shape[-1] == size:
        return images
    return interpolate(images[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0].clamp(0, 1)


@dataclass(frozen=True)
class FontGroup:
    """One type design (all its weights and slants, and its near-clones): the unit that goes to one split, so no
    test font is a re-weighted or metric-cloned train font."""

    name: str
    style: str  # serif | sans | mono
    split: str  # train | val | test
    package: str  # the Debian package(s), space-separated, that install it
    patterns: tuple[str, ...]  # file-name globs searched under FONT_DIRS


@dataclass(frozen=True)
class FontFile:
    path: Path
    group: str
    style: str
    split: str

    @property
    def bold(self) -> bool:
        return any(w in self.path.stem for w in ("Bold", "Demi", "Bd"))

    @property
    def italic(self) -> bool:
        return any(w in self.path.stem for w in ("Ita", "Oblique"))


def _font_index() -> dict[str, Path]:
    """File name -> path for every font file under FONT_DIRS (first one wins, in sorted order)."""
    index: dict[str, Path] = {}
    for root in FONT_DIRS:
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path.suffix.lower() in {".ttf", ".otf"}:
                index.setdefault(path.name, path)
    return index


def find_fonts(groups: Iterable[FontGroup]) -> list[FontFile]:
    """Every installed file of every group, in a fixed order; one error naming all missing packages otherwise."""
    index = _font_index()
    found, missing = [], {}
    for group in groups:
        matches = [fnmatch.filter(index, pattern) for pattern in group.patterns]
        if not all(matches):  # every pattern must find a file, so a partly installed design is not silently smaller
            missing[group.name] = group.package
        found += [FontFile(index[n], group.name, group.style, group.split) for n in sorted({n for m in matches for n in m})]
    if missing:
        packages = {p for names in missing.values() for p in names.split()}
        raise MergeInputError(f"fonts not installed: {', '.join(sorted(missing))}", install_fix(packages))
    return found


class GlyphRenderer:
    """Draws one character of one font as a white-on-black size×size image, on a fixed baseline (so ',' and '\\''
    or 'o' and 'O' stay distinguishable), with seeded jitter of size, position and angle as handwriting-free variety.

    Glyphs are drawn at `oversample`× and box-filtered down. Pillow's basic layout (no shaping library) keeps the
    pixels independent of optional system libraries.
    """

    def __init__(self, size: int, oversample: int = 3) -> None:
        self.size, self.canvas = size, size * oversample
        self._fonts: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}
        self._notdef: dict[Path, bytes] = {}
        self._covers: dict[tuple[Path, str], bool] = {}

    def _font(self, path: Path, px: int) -> ImageFont.FreeTypeFont:
        key = (path, px)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(path), px, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[key]

    def _draw(self, char: str, path: Path, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0,
              angle: float = 0.0) -> Image.Image:
        c = self.canvas
        image = Image.new("L", (c, c), 0)
        font = self._font(path, max(4, round(0.85 * c * scale)))
        ImageDraw.Draw(image).text((c / 2 + dx * c, 0.78 * c + dy * c), char, fill=255, font=font, anchor="ms")
        return image.rotate(angle, resample=Image.Resampling.BILINEAR) if angle else image

    def covers(self, path: Path, char: str) -> bool:
        """The font maps the character to a real, visible glyph (not its .notdef box)."""
        if (path, char) not in self._covers:
            if path not in self._notdef:
                self._notdef[path] = self._draw(MISSING_GLYPH, path).tobytes()
            pixels = self._draw(char, path).tobytes()
            self._covers[path, char] = pixels != self._notdef[path] and any(pixels)
        return self._covers[path, char]

    def render(self, pairs: list[tuple[str, Path]], gen: torch.Generator) -> torch.Tensor:
        """float32 [N, size, size] in [0, 1]; jitter: size ×0.8–1.05, shift ±6% of the box, rotation ±8°."""
        jitter = torch.rand(len(pairs), 4, generator=gen, dtype=torch.float64).tolist()
        out = np.empty((len(pairs), self.size, self.size), dtype=np.float32)
        for i, ((char, path), (s, dx, dy, a)) in enumerate(zip(pairs, jitter)):
            image = self._draw(char, path, 0.8 + 0.25 * s, 0.12 * (dx - 0.5), 0.12 * (dy - 0.5), 16.0 * (a - 0.5))
            out[i] = np.asarray(image.resize((self.size, self.size), Image.Resampling.BOX), dtype=np.float32) / 255.0
        return torch.from_numpy(out)
