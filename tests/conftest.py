import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
from service.tiny_models import make_family  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """One tiny family per supported architecture, built once per test session."""
    cache = {}

    def get(kind: str, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_family(kind, tmp_path_factory.mktemp(kind), **kwargs)
        return cache[key]

    return get
