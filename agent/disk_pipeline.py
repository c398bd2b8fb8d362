"""Worker threads that keep disk writes and hashing off the event loop.

Measured (docs/performance.md): handing each batch to ``trio.to_thread.run_sync`` cost about a
third of the relay's throughput in thread start-up and nursery bookkeeping. Long-lived threads
fed by queues cost a queue put per chunk and one ``run_sync_soon`` callback per result. pwrite,
sha256 and xxh3 all release the GIL, so they run beside the event loop.

- ``SequentialWriter`` appends a stream (the origin's bytes) to the partial file.
- ``PrefixHasher`` follows the contiguous prefix of the file (through an mmap: no copy) and
  computes the blob's sha256 plus the xxh3-128 of every piece it passes, in order. Pieces from
  peers land out of order; the prefix is what both the sha256 and the local client need.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import queue
import threading
from collections.abc import Callable

import trio

from p2preg.metainfo import piece_hash

_STOP = object()
HASH_STEP = 8 * 1024 * 1024


class _Worker:
    """A daemon thread that reports back into trio; subclasses implement ``_loop``."""

    def __init__(self, name: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._running = True
        self._error: BaseException | None = None
        self._changed = trio.Event()
        self._stopped = False
        self._aborted = False
        threading.Thread(target=self._main, name=name, daemon=True).start()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._post(self._failed, exc)
        finally:
            self._post(self._exited)

    def _loop(self) -> None:
        raise NotImplementedError

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        # RunFinishedError: the agent is shutting down; nobody waits for this any more.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(callback, *args)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _failed(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def _exited(self) -> None:
        self._running = False
        self._notify()

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)

    async def join(self) -> None:
        """Stop after the queued work and wait; raise what the thread raised. Interrupted
        while waiting (cancelled), it aborts instead: either way the thread is gone when this
        returns, so the caller may close its file descriptors."""
        self._stop()
        try:
            while self._running:
                await self._changed.wait()
        except BaseException:
            await self.abort()
            raise
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop now, skipping queued work, and wait for the thread to be gone.

        Callers close file descriptors next; a thread still writing to a closed (maybe reused)
        descriptor would corrupt another file.
        """
        self._aborted = True
        self._stop()
        with trio.CancelScope(shield=True):
            while self._running:
                await self._changed.wait()


class SequentialWriter(_Worker):
    """Writes a stream of chunks at increasing offsets; ``put`` applies backpressure."""

    def __init__(
        self,
        write: Callable[[bytes, int], None],
        start: int,
        on_written: Callable[[int], None],
        max_pending: int,
    ) -> None:
        self._write = write
        self._on_written = on_written
        self._max_pending = max_pending
        self._backlog = 0
        self.offset = start  # where the next chunk goes (received, maybe not written yet)
        self.written = start
        super().__init__("p2preg-write")

    async def put(self, chunk: bytes) -> None:
        while self._backlog >= self._max_pending and self._error is None and self._running:
            await self._changed.wait()
        if self._error is not None:
            raise self._error
        self._backlog += len(chunk)
        self._queue.put((chunk, self.offset))
        self.offset += len(chunk)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._aborted:
                continue
            assert isinstance(item, tuple)
            chunk: bytes = item[0]
            offset: int = item[1]
            self._write(chunk, offset)
            self._post(self._done, len(chunk))

    def _done(self, nbytes: int) -> None:
        self._backlog -= nbytes
        self.written += nbytes
        self._on_written(self.written)
        self._notify()


class PrefixHasher(_Worker):
    """sha256 of the whole blob plus xxh3-128 of each piece, following the contiguous prefix."""

    def __init__(
        self,
        fd: int,
        size: int,
        piece_length: int,
        algorithm: str,
        on_piece: Callable[[int, bytes], None],
    ) -> None:
        self.sha = hashlib.new(algorithm)
        self._size = size
        self._piece_length = piece_length
        self._on_piece = on_piece
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        self.hashed = 0
        super().__init__("p2preg-hash")

    def advance(self, target: int) -> None:
        """The prefix ``[0, target)`` is on disk: hash up to there."""
        self._queue.put(target)

    def _loop(self) -> None:
        hashed = 0
        try:
            while True:
                item = self._queue.get()
                if item is _STOP or self._aborted:
                    if item is _STOP:
                        return
                    continue
                target = min(int(item), self._size)  # type: ignore[call-overload]
                if self._map is None or target <= hashed:
                    continue
                with memoryview(self._map) as view:
                    while hashed < target:
                        piece_end = min(
                            self._size, (hashed // self._piece_length + 1) * self._piece_length
                        )
                        step_end = min(target, piece_end, hashed + HASH_STEP)
                        self.sha.update(view[hashed:step_end])
                        hashed = step_end
                        if hashed == piece_end:
                            index = (piece_end - 1) // self._piece_length
                            start = index * self._piece_length
                            self._post(self._piece_done, index, piece_hash(view[start:piece_end]))
                        self._post(self._hashed_to, hashed)
        finally:
            if self._map is not None:
                self._map.close()

    def _piece_done(self, index: int, value: bytes) -> None:
        self._on_piece(index, value)

    def _hashed_to(self, offset: int) -> None:
        self.hashed = offset
        self._notify()

    async def wait_hashed(self, offset: int) -> None:
        while self.hashed < offset and self._error is None and self._running:
            await self._changed.wait()
        if self._error is not None:
            raise self._error
