"""The one keyed JSON store behind every cache: entries under string keys, written atomically under a file lock.

File layout::

    {"format": "hmc_plugin.store", "version": 1, "entries": {"<key>": {"key": <the key's data>, "value": ...}}}

A key is the digest of the JSON data it stands for (``key_of``); the entry keeps that data, so a
reader can see what it was made from, and a store whose ``version`` differs (an older layout of the
values) is read as empty. Saves merge with what other processes (NNI trials) wrote since this one
read the file, so concurrent runs keep each other's entries. A damaged file only costs recomputing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

__all__ = ['FORMAT', 'JsonStore', 'key_of', 'write_json_atomic']

_logger = logging.getLogger(__name__)

FORMAT = 'hmc_plugin.store'


def key_of(data: Any) -> str:
    """A short stable digest of JSON-serialisable ``data`` (sorted keys), used as a store key."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=indent, sort_keys=sort_keys)
    temporary = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    temporary.write_text(text)
    os.replace(temporary, path)
    return text


class JsonStore:
    """Values under string keys in one JSON file; ``get`` / ``put`` / ``save``, atomic and locked.

    ``save_every``: a ``put`` writes the file after that many new entries (1: every entry is on disk as
    soon as it is made, so an interrupted run keeps it); ``save()`` writes the rest. ``added`` counts the
    entries this object put, ``unsaved`` those not written yet.

    >>> store = JsonStore('/tmp/cells.json')
    >>> store.get_or_compute({'model': 'resnet20', 'target': 0.5}, lambda: {'acc': 0.91})
    {'acc': 0.91}
    """

    def __init__(self, path: str | os.PathLike, version: int = 1, save_every: int = 1):
        self.path, self.version, self.save_every = Path(path), version, save_every
        self.added = 0
        self._unsaved = 0
        self.entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            _logger.warning('%s is damaged; its entries are computed again', self.path)
            return {}
        if not isinstance(data, dict) or data.get('format') != FORMAT or data.get('version') != self.version:
            return {}
        entries = data.get('entries')
        return entries if isinstance(entries, dict) else {}

    @property
    def unsaved(self) -> int:
        """Entries put since the file was last written (0 right after a save)."""
        return self._unsaved

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, else ``default``."""
        entry = self.entries.get(key)
        return entry['value'] if isinstance(entry, dict) and 'value' in entry else default

    def put(self, key: str, value: Any, key_data: Any = None) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``; ``key_data`` is what the key was made from."""
        self.entries[key] = {'key': key_data, 'value': value} if key_data is not None else {'value': value}
        self.added += 1
        self._unsaved += 1
        if self._unsaved >= self.save_every:
            self.save()

    def get_or_compute(self, key_data: Any, compute: Callable[[], Any]) -> Any:
        """The value stored for ``key_data`` (by ``key_of``), or ``compute()``, stored at once."""
        key = key_of(key_data)
        if key not in self.entries:
            self.put(key, compute(), key_data)
        return self.get(key)

    def save(self) -> None:
        """Merge this object's entries into the file (other writers' entries are kept) and write it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + '.lock'):
            self.entries = {**self._read(), **self.entries}
            write_json_atomic(self.path, {'format': FORMAT, 'version': self.version, 'entries': self.entries},
                              indent=0, sort_keys=True)
        self._unsaved = 0
