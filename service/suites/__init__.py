"""Real-data checkpoint suites: genuinely pretrained-then-fine-tuned HF models plus their task data, built offline.

The tiny families in service/tiny_models.py only exercise code paths; these suites carry real accuracy, so merge
quality (and the gap that test-time adaptation must close) can be measured.

SUITES names every suite `rankmerge bench build|run|report` knows: name -> (module, builder function, keyword
arguments). Each builder is `build(root: Path, seed: int = 0, **kwargs) -> Suite` and reuses a complete suite in
root. Modules are imported only when their suite is built, so the CLI stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rankmerge.service.suites.common import Suite
from rankmerge.service.suites.digits import DigitsSuite, build_digits_suite

SUITES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "digits-smoke": ("rankmerge.service.suites.digits", "build_digits_suite", {"scale": "test"}),
    "digits": ("rankmerge.service.suites.digits", "build_digits_suite", {"scale": "bench"}),
    "text-smoke": ("rankmerge.service.suites.text", "build_text_suite", {"scale": "smoke"}),
    "text": ("rankmerge.service.suites.text", "build_text_suite", {"scale": "full"}),
    "vision-smoke": ("rankmerge.service.suites.vision", "build_vision_suite", {"suite": "vision-smoke"}),
    "vision8": ("rankmerge.service.suites.vision", "build_vision_suite", {"suite": "vision8"}),
    "vision14": ("rankmerge.service.suites.vision", "build_vision_suite", {"suite": "vision14"}),
    "vision20": ("rankmerge.service.suites.vision", "build_vision_suite", {"suite": "vision20"}),
    "shift5": ("rankmerge.service.suites.vision", "build_vision_suite", {"suite": "shift5"}),
}


def build_suite(name: str, root: Path, seed: int = 0) -> Suite:
    """Build (or reuse) the named suite under root."""
    if name not in SUITES:
        raise KeyError(name)
    module, function, kwargs = SUITES[name]
    return getattr(importlib.import_module(module), function)(Path(root), seed=seed, **kwargs)


__all__ = ["SUITES", "DigitsSuite", "Suite", "build_digits_suite", "build_suite"]
