"""skinsynth: synthetic dermoscopy and semi-supervised learning experiments on Ray.

A research tool, not a medical device: nothing it produces is a diagnosis.
"""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = (
    "skinsynth is a research tool, not a medical device: its outputs are not a diagnosis "
    "and must not be used for clinical decisions."
)
