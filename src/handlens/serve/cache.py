"""The explanation cache: an LRU of computed explanations keyed by (bundle hash, image hash, method, layer,
target, parameters)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any


class ExplanationCache:
    """``get`` counts one hit or miss per request; ``peek`` (the re-check after waiting for a slot) counts
    nothing, so a miss is never counted twice."""

    def __init__(self, items: int) -> None:
        self.items = items
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def peek(self, key: str) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return None

    def get(self, key: str) -> Any:
        found = self.peek(key)
        with self._lock:
            if found is not None:
                self.hits += 1
            else:
                self.misses += 1
        return found

    def put(self, key: str, value: Any) -> None:
        if self.items <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.items:
                self._data.popitem(last=False)
