"""A small LRU cache bounded by bytes, with hit and miss counts."""

from __future__ import annotations

import threading
from collections import OrderedDict


class ByteLRU:
    def __init__(self, max_bytes: int, name: str = "cache"):
        self.max_bytes = max(0, int(max_bytes))
        self.name = name
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size

    def __contains__(self, key) -> bool:  # no hit or miss counted, no change of order
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._items), "bytes": self.bytes,
                "max_bytes": self.max_bytes}
