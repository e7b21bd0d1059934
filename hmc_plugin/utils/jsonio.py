"""JSON in and out for the plain-data seams (``SensitivityTable``, ``CompressionPlan``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .store import write_json_atomic

__all__ = ['read_json', 'write_json', 'encode_float', 'decode_float']


def read_json(text_or_path: str | os.PathLike) -> Any:
    """Parse a JSON text, or the file at that path (a text starting with '{' is taken as JSON)."""
    text = str(text_or_path)
    if not text.lstrip().startswith('{'):
        text = Path(text_or_path).read_text()
    return json.loads(text)


def write_json(data: Any, path: str | os.PathLike | None = None) -> str:
    """Serialise ``data``; when ``path`` is given, write it atomically (``store.write_json_atomic``)."""
    if path is None:
        return json.dumps(data, indent=1)
    return write_json_atomic(path, data, indent=1)


def encode_float(value):
    """``'inf'`` for an infinite float (JSON has no infinity), anything else as it is."""
    return 'inf' if isinstance(value, float) and math.isinf(value) else value


def decode_float(value):
    """The inverse of :func:`encode_float`."""
    return math.inf if value == 'inf' else value
