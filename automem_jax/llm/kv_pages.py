"""Host-side bookkeeping of the engine's paged KV cache: page allocation and the prefix cache.

The device holds one pool of `num_pages` pages of `page_size` tokens per layer; a sequence owns
an ordered list of pages (its page table). Full pages are also registered in a prefix cache under
an exact key: (id of the previous block, the block's token ids). A new prompt walks that chain
from its first block and shares every page it finds (vLLM's block hashing, without hash
collisions: keys hold the tokens and ids are never reused), so the instruction text that opens
every agent's prompt is prefilled once.

Pages are reference-counted. A page nobody references but that holds a cached block stays in an
LRU list and is evicted only when a new page is needed, so eviction never touches a live sequence.
Everything here is deterministic (no hashing of strings, no timing), so every host of a
multi-host run makes the same decisions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT = -1  # parent id of a sequence's first block


class OutOfPages(RuntimeError):
    pass


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.ref = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages with ref 0, oldest first
        self._key_of: dict[int, tuple] = {}  # page -> its block key
        self._id_of: dict[int, int] = {}  # page -> block id (a child's parent id)
        self._by_key: dict[tuple, int] = {}  # block key -> page
        self._next_id = 0
        self.evictions = 0

    # ---- capacity ------------------------------------------------------------------------------
    def available(self) -> int:
        """Pages that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def cached_pages(self) -> int:
        return len(self._key_of)

    # ---- prefix cache --------------------------------------------------------------------------
    def block_key(self, parent_id: int, tokens: Sequence[int]) -> tuple:
        return (parent_id, tuple(tokens))

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """The cached pages holding the longest run of `tokens`' full blocks (at most max_blocks),
        and their block ids. Nothing is acquired."""
        P = self.page_size
        pages, ids, parent = [], [], ROOT
        for b in range(max_blocks):
            page = self._by_key.get(self.block_key(parent, tokens[b * P:(b + 1) * P]))
            if page is None:
                break
            pages.append(page)
            parent = self._id_of[page]
            ids.append(parent)
        return pages, ids

    def register(self, page: int, parent_id: int, tokens: Sequence[int]) -> int:
        """Publishes a full page under (parent_id, tokens); returns the block id that now stands for
        this block (another page's when that block is already cached: this page stays private)."""
        assert len(tokens) == self.page_size and self.ref[page] > 0
        key = self.block_key(parent_id, tokens)
        owner = self._by_key.get(key)
        if owner is not None:
            return self._id_of[owner]
        if page in self._key_of:  # already published under another key: keep the first
            return self._id_of[page]
        self._by_key[key] = page
        self._key_of[page] = key
        self._id_of[page] = bid = self._next_id
        self._next_id += 1
        return bid

    # ---- references ----------------------------------------------------------------------------
    def acquire(self, pages: Sequence[int]) -> None:
        for p in pages:
            if self.ref[p] == 0:
                self._lru.pop(p, None)
            self.ref[p] += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (ref 1), evicting the least recently used cached blocks when needed."""
        if n > self.available():
            raise OutOfPages(f"need {n} pages, {self.available()} available")
        out = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._lru.popitem(last=False)
                self._forget(p)
                self.evictions += 1
            self.ref[p] = 1
            out.append(p)
        return out

    def release(self, pages: Sequence[int]) -> None:
        for p in pages:
            assert self.ref[p] > 0, f"page {p} released more often than acquired"
            self.ref[p] -= 1
            if self.ref[p] == 0:
                if p in self._key_of:
                    self._lru[p] = None  # most recently used at the end
                else:
                    self._free.append(p)

    def clear(self) -> None:
        """Forgets every cached block (after the weights change). Live pages stay allocated."""
        for p in list(self._key_of):
            self._forget(p)
        for p in list(self._lru):
            self._free.append(p)
        self._lru.clear()

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._by_key[key]
            del self._id_of[page]

    def check(self) -> None:
        """Invariants (tests): every page is exactly one of live, cached-idle or free."""
        live = {p for p in range(self.num_pages) if self.ref[p] > 0}
        free = set(self._free)
        idle = set(self._lru)
        assert not (live & free) and not (live & idle) and not (free & idle)
        assert live | free | idle == set(range(self.num_pages))
        assert len(free) == len(self._free)
        assert all(p in self._key_of for p in idle)
        assert all(self._by_key[k] == p for p, k in self._key_of.items())
