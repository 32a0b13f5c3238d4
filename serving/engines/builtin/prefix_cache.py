"""The prefix cache: the KV of earlier prompts (and of finished answers), reused by later prompts that
start the same way, so a conversation's turn N prefills only what turn N-1 did not already compute.

What is reused must be exactly what a cold prefill would compute:
- A prompt is keyed by its token ids, with every image or video placeholder run keyed by that item's
  identity: its full content digest, its grid and, for a video, the seconds per temporal patch that set
  its time positions. Two images of the same size have the same placeholder ids (the same count of the
  same token), so keying by ids alone serves one picture's KV for another (reproduced: logits off by 25).
- A hit never ends inside an image or video run (the suffix then holds whole items only, and their vision
  tower runs as usual), and is at most the prompt's length minus one: the last token is always computed,
  so the prompt has logits.
- Rope positions are not stored: a prefix's 3-D positions depend only on the prefix (its ids and grids), so
  the prefill computes them for the whole prompt, as without a hit, and uses the suffix's slice.

Lookup: the key's ids are cut into blocks of BLOCK tokens, each block hashed with all blocks before it and
the identities of the media runs it touches; a dict from those chained hashes to entries finds the entries
sharing the longest run of whole blocks in one pass over the prompt, then the candidates are compared
token by token (past the last whole block, and from the start for the chosen one: nothing is trusted to
the hash alone).

Entries are whole sequences (a prompt, or a finished row's prompt plus answer) with their KV, one tensor
pair per layer, on the model's device, bounded in bytes and evicted least recently used. An entry that is
a prefix of a newer one is dropped (the newer one serves every lookup it served), so a conversation holds
one entry, its latest turn. A hit copies the KV into the new row's own cache, so evicting an entry never
touches a running row.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

BLOCK = 16  # tokens per hashed block; also the shortest entry worth keeping

# PREFIX_CACHE_MB when the setting is -1 (auto), by device. Qwen2.5-VL-3B's KV per token: 36 layers x K and V
# x 2 KV heads x 128 x 2 bytes = 36 KiB in bf16 (72 KiB in fp32, a CPU's default): 512 MB hold ~7,300 fp32
# tokens (about ten conversations about a 448x448 picture), 2048 MB ~58,000 bf16 tokens.
AUTO_MB = {"cpu": 512, "gpu": 2048}


@dataclass(frozen=True)
class MediaRun:
    """One image's or video's placeholder tokens in a prompt: [start, end) and what they stand for."""

    start: int
    end: int
    kind: str  # "image" or "video"
    identity: tuple  # (content digest, grid (t, h, w), seconds per temporal patch or None)


@dataclass(frozen=True)
class PrefixKey:
    ids: np.ndarray  # int64 token ids
    runs: tuple  # MediaRun, in prompt order

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def extended(self, more_ids) -> "PrefixKey":
        """This key followed by text tokens (a row's answer)."""
        return PrefixKey(np.concatenate([self.ids, np.asarray(more_ids, dtype=np.int64)]), self.runs)

    def block_hashes(self) -> list:
        """The chained hash of each whole block: block i's covers ids[: (i + 1) * BLOCK] and the runs touching them."""
        hashes, previous = [], b""
        for block in range(len(self) // BLOCK):
            low, high = block * BLOCK, (block + 1) * BLOCK
            digest = hashlib.blake2b(previous, digest_size=16)
            digest.update(self.ids[low:high].tobytes())
            for run in self.runs:
                if run.start < high and run.end > low:
                    digest.update(repr((run.start, run.end, run.kind, run.identity)).encode())
            previous = digest.digest()
            hashes.append(previous)
        return hashes

    def usable(self, length: int) -> int:
        """`length` cut back so that it ends neither inside a media run nor at the last token."""
        length = min(length, len(self) - 1)
        for run in self.runs:
            if run.start < length < run.end:
                return run.start
        return max(0, length)


def prompt_key(arrays: dict, image_keys, video_keys, image_token: int, video_token: int,
               merge: int) -> Optional[PrefixKey]:
    """The key of a prompt (engine.build_prompt's arrays and media keys); None when its placeholders do not
    add up to its images and videos (then it is neither looked up nor stored)."""
    ids = np.asarray(arrays["input_ids"][0], dtype=np.int64)
    runs = []
    for kind, token, keys, grids, seconds in (
            ("image", image_token, image_keys, arrays.get("image_grid_thw"), None),
            ("video", video_token, video_keys, arrays.get("video_grid_thw"), arrays.get("second_per_grid_ts"))):
        positions = np.flatnonzero(ids == token)
        grids = np.zeros((0, 3), dtype=np.int64) if grids is None else np.asarray(grids).reshape(-1, 3)
        sizes = [int(np.prod(g)) // merge for g in grids]
        if len(keys) != len(grids) or sum(sizes) != len(positions):
            return None
        at = 0
        for i, (key, grid, size) in enumerate(zip(keys, grids, sizes)):
            start, end = int(positions[at]), int(positions[at + size - 1]) + 1
            if end - start != size:  # one item's placeholders are contiguous
                return None
            per_patch = None if seconds is None else float(np.asarray(seconds).reshape(-1)[i])
            runs.append(MediaRun(start, end, kind, (str(key), tuple(int(x) for x in grid), per_patch)))
            at += size
    return PrefixKey(ids, tuple(sorted(runs, key=lambda r: r.start)))


@dataclass
class Hit:
    """A cached prefix for a prompt: its first `length` tokens' KV, one (keys, values) pair per layer,
    [1, heads, length, dim]; `images` and `videos`: the prompt's items wholly inside it (all of them
    before the suffix, which starts at a token that is no placeholder of theirs)."""

    length: int
    layers: list
    images: int
    videos: int


class _Entry:
    def __init__(self, key: PrefixKey, layers: list, nbytes: int):
        self.key, self.layers, self.nbytes = key, layers, nbytes
        self.hashes = key.block_hashes()
        self.runs_at = {run.start: run for run in key.runs}


class PrefixCache:
    """Entries bounded by `max_bytes` (0: nothing is kept), least recently used first out. Thread-safe:
    prompts are looked up from the prefill lanes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict = OrderedDict()  # id(entry) -> _Entry, least recently used first
        self._by_hash: dict = {}  # chained block hash -> {id(entry): entry}
        self._lock = threading.Lock()
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.hit_tokens = 0  # prompt tokens whose prefill a hit spared
        self.inserts = 0
        self.evictions = 0  # entries dropped for room (not those a longer entry replaced)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, key: Optional[PrefixKey]) -> Optional[Hit]:
        """The longest usable cached prefix of `key`'s prompt, or None."""
        if key is None or not self.enabled:
            return None
        with self._lock:
            self.lookups += 1
            entry, length = self._longest(key)
            length = key.usable(length)
            if entry is None or length < BLOCK:
                return None
            self._entries.move_to_end(id(entry))
            self.hits += 1
            self.hit_tokens += length
            layers = [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers]
        return Hit(length, layers, *_items_before(key, length))

    def insert(self, key: Optional[PrefixKey], layers: list) -> None:
        """Keep `layers` (one (keys, values) pair per layer, [1, heads, len(key), dim], owned by the cache
        from now on: nothing may write into them) as the KV of `key`."""
        if key is None or not self.enabled or len(key) < BLOCK:
            return
        nbytes = sum(_nbytes(k) + _nbytes(v) for k, v in layers)
        if nbytes > self.max_bytes:
            return
        entry = _Entry(key, layers, nbytes)
        with self._lock:
            for old in self._prefixes_of(entry):
                if len(old.key) >= len(key):  # already held, as long or longer
                    self._entries.move_to_end(id(old))
                    return
                self._remove(old)  # a shorter prefix: the new entry serves its every hit
            self._entries[id(entry)] = entry
            for h in entry.hashes:
                self._by_hash.setdefault(h, {})[id(entry)] = entry
            self.bytes += nbytes
            self.inserts += 1
            while self.bytes > self.max_bytes:
                self._remove(next(iter(self._entries.values())))
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                self._remove(entry)

    def stats(self) -> dict:
        return {"lookups": self.lookups, "hits": self.hits, "hit_tokens": self.hit_tokens, "inserts": self.inserts,
                "evictions": self.evictions, "entries": len(self._entries), "bytes": self.bytes,
                "max_bytes": self.max_bytes}

    # ------------------------------------------------------------------ under the lock

    def _longest(self, key: PrefixKey) -> tuple:
        """(entry, common length) for the entry sharing the most tokens with `key` (None, 0 when none shares a block)."""
        candidates, blocks = {}, 0
        for h in key.block_hashes():
            found = self._by_hash.get(h)
            if not found:
                break
            candidates, blocks = found, blocks + 1
        best, best_length = None, 0
        for entry in candidates.values():
            length = _common(key, entry, blocks * BLOCK)
            if length > best_length:
                best, best_length = entry, length
        if best is None or _common(key, best, 0) != best_length:  # checked from the start: the hash is no proof
            return None, 0
        return best, best_length

    def _prefixes_of(self, new: _Entry) -> list:
        """Entries whose whole key starts `new`'s key, or that start with its whole key. Such an entry's whole
        blocks are all in `new`'s chain (or `new`'s all in its): it is found at the level of the shorter's last
        whole block."""
        found = []
        for level, h in enumerate(new.hashes, start=1):
            holders = self._by_hash.get(h)
            if not holders:
                break
            for entry in holders.values():
                if level in (len(entry.hashes), len(new.hashes)) and \
                        _common(new.key, entry, 0) == min(len(entry.key), len(new.key)):
                    found.append(entry)
        return list({id(e): e for e in found}.values())

    def _remove(self, entry: _Entry) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        for h in entry.hashes:
            holders = self._by_hash.get(h)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._by_hash[h]
        self.bytes -= entry.nbytes


def _common(key: PrefixKey, entry: _Entry, start: int) -> int:
    """How many first tokens `key` and `entry` share, ids and media identities (compared from `start` on;
    the tokens before it are taken as shared)."""
    other = entry.key
    n = min(len(key), len(other))
    differ = np.flatnonzero(key.ids[start:n] != other.ids[start:n])
    length = start + int(differ[0]) if differ.size else n
    for run in key.runs:  # a run whose ids match must be the same item, starting at the same token
        if run.start >= length:
            break
        if run.end <= start:
            continue
        if entry.runs_at.get(run.start) != run:
            return run.start
    for run in other.runs:  # and a run of the entry's inside the shared part must be one of the key's
        if run.start >= length:
            break
        if run.start >= start and run not in key.runs:
            return run.start
    return length


def _items_before(key: PrefixKey, length: int) -> tuple:
    images = sum(1 for run in key.runs if run.kind == "image" and run.end <= length)
    videos = sum(1 for run in key.runs if run.kind == "video" and run.end <= length)
    return images, videos


def _nbytes(tensor) -> int:
    return int(np.prod(tensor.shape)) * _element_size(tensor.dtype)


def _element_size(dtype) -> int:
    name = str(dtype)
    return 8 if name.endswith(("float64", "int64")) else 2 if name.endswith(("float16", "bfloat16")) else 4
