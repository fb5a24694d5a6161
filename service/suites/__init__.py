"""Real-data checkpoint suites: genuinely pretrained-then-fine-tuned HF models plus their task data, built offline.

The tiny families in service/tiny_models.py only exercise code paths; these suites carry real accuracy, so merge
quality (and the gap that test-time adaptation must close) can be measured in seconds.
"""

from service.suites.digits import DigitsSuite, build_digits_suite

__all__ = ["DigitsSuite", "build_digits_suite"]
