"""Decoded key histories kept in the worker's memory between timer firings.

A streaming firing of the point-in-time step needs its key's `KeyHistory`
objects: the observations of the horizon with their window indexes. Read
from state and rebuilt at every firing, a busy key would cost O(window) per
firing; Beam's own state cache does not help (it is off on Dataflow by
default, and it would still hand back encoded lists to rebuild from). So
the histories a firing leaves stay here, in the process, for the next
firing of the same state key.

They are used only while they are exactly what the state holds: each firing
that changes the state writes a fresh random token beside it, and keeps the
histories under that token. A firing whose state holds another token (the
bundle that wrote ours failed, the key moved to another worker and back, the
job restarted) rebuilds from the log in state (transforms/history_log.py).
A runner processes one key at a time, and a firing takes its entry out
while it works, so an entry is never used by two firings at once.

Bounded by the observations held, least recently used first; an entry
dropped is rebuilt from state when its key fires again.
"""

from __future__ import annotations

import collections
import random
import threading
from typing import Optional

MAX_OBSERVATIONS = 2_000_000  # per process, over every state key: about a few hundred MB


class KeptHistories:
    """(owner, state key) -> (token, value, size), least recently used dropped first beyond max_size."""

    def __init__(self, max_size: int = MAX_OBSERVATIONS):
        self._entries: "collections.OrderedDict[tuple, tuple[int, object, int]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._size = 0
        self.max_size = max_size

    def take(self, key: tuple, token: Optional[int]) -> Optional[object]:
        """The value kept for `key` under `token`, or None (another token, or none kept).
        Taken out: the firing changes it in place, and if its bundle fails before the
        firing puts it back under a new token, no later firing may find it half-changed."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._size -= entry[2]
            return entry[1] if token is not None and entry[0] == token else None

    def put(self, key: tuple, token: int, value: object, size: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= old[2]
            self._entries[key] = (token, value, size)
            self._size += size
            while self._size > self.max_size and self._entries:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._size -= dropped

    def drop(self, key: tuple) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= old[2]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._size = 0

    def __len__(self) -> int:
        return len(self._entries)


def new_token() -> int:
    """A token for what a firing wrote: random, so no other writer's state can carry it."""
    return random.getrandbits(62)


KEPT = KeptHistories()
