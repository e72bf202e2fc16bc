"""The base of every error that is the user's to fix (bad config, missing path, bad split settings, ...).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SkinsynthError(Exception):
    """An error with a message meant for the user."""
