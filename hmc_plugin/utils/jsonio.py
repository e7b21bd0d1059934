"""JSON in and out for the plain-data seams (``SensitivityTable``, ``CompressionPlan``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ['read_json', 'write_json', 'encode_float', 'decode_float']


def read_json(text_or_path: str | os.PathLike) -> Any:
    """Parse a JSON text, or the file at that path (a text starting with '{' is taken as JSON)."""
    text = str(text_or_path)
    if not text.lstrip().startswith('{'):
        text = Path(text_or_path).read_text()
    return json.loads(text)


def write_json(data: Any, path: str | os.PathLike | None = None) -> str:
    """Serialise ``data``; when ``path`` is given, write it atomically (a crash never leaves half a file)."""
    text = json.dumps(data, indent=1)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, path)
    return text


def encode_float(value):
    """``'inf'`` for an infinite float (JSON has no infinity), anything else as it is."""
    return 'inf' if isinstance(value, float) and math.isinf(value) else value


def decode_float(value):
    """The inverse of :func:`encode_float`."""
    return math.inf if value == 'inf' else value
