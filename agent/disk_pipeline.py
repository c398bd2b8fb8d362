"""Write and hash a stream of chunks on two long-lived threads, off the event loop.

Measured (docs/performance.md): handing each batch to ``trio.to_thread.run_sync`` cost about a
third of the relay's throughput in thread start-up and nursery bookkeeping. Two dedicated threads
fed by queues cost a queue put per chunk and one ``run_sync_soon`` callback per chunk back into
trio. pwrite and sha256 both release the GIL, so they run in parallel with each other and with
the event loop receiving the next chunk.

Backpressure: ``put`` waits while more than ``max_pending`` bytes are queued but not yet written
or hashed, so a slow disk slows the origin download instead of growing memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import trio

from agent.content_store import PartialBlob

_STOP = object()


class WriteHashPipeline:
    def __init__(
        self,
        partial: PartialBlob,
        write: Callable[[PartialBlob, bytes, int], None],
        on_written: Callable[[int], None],
        max_pending: int,
    ) -> None:
        self._partial = partial
        self._write = write
        self._on_written = on_written
        self._max_pending = max_pending
        self._token = trio.lowlevel.current_trio_token()
        self._write_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._hash_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._write_backlog = 0
        self._hash_backlog = 0
        self._threads_running = 2
        self._error: BaseException | None = None
        self._aborted = False
        self._stopped = False
        self._changed = trio.Event()
        self.received = 0
        offset = partial.written
        for name, target, args in (
            ("p2preg-write", self._write_loop, (offset,)),
            ("p2preg-hash", self._hash_loop, ()),
        ):
            threading.Thread(target=target, args=args, name=name, daemon=True).start()

    # -- trio side -----------------------------------------------------------------------------

    async def put(self, chunk: bytes) -> None:
        while (
            max(self._write_backlog, self._hash_backlog) >= self._max_pending
            and self._error is None
        ):
            await self._changed.wait()
        if self._error is not None:
            raise self._error
        self._write_backlog += len(chunk)
        self._hash_backlog += len(chunk)
        self.received += len(chunk)
        self._write_queue.put(chunk)
        self._hash_queue.put(chunk)

    async def finish(self) -> None:
        """Wait until every chunk is written and hashed; raise what a thread raised."""
        self._stop()
        while self._threads_running:
            await self._changed.wait()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Stop without finishing: the threads skip what is still queued and exit.

        Returns only once both threads are gone: the caller closes the partial file next, and a
        thread still writing to a closed (and maybe reused) descriptor would corrupt another file.
        """
        self._aborted = True
        self._stop()
        with trio.CancelScope(shield=True):
            while self._threads_running:
                await self._changed.wait()

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._write_queue.put(_STOP)
            self._hash_queue.put(_STOP)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _written(self, nbytes: int) -> None:
        self._write_backlog -= nbytes
        self._partial.written += nbytes
        self._on_written(self._partial.written)
        self._notify()

    def _hashed(self, nbytes: int) -> None:
        self._hash_backlog -= nbytes
        self._notify()

    def _failed(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def _thread_done(self) -> None:
        self._threads_running -= 1
        self._notify()

    # -- worker threads ------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        # RunFinishedError: the agent is shutting down; nobody waits for this any more.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(callback, *args)

    def _write_loop(self, offset: int) -> None:
        failed = False
        while (item := self._write_queue.get()) is not _STOP:
            if failed or self._aborted:
                continue
            assert isinstance(item, bytes)
            try:
                self._write(self._partial, item, offset)
            except BaseException as exc:
                failed = True
                self._post(self._failed, exc)
                continue
            offset += len(item)
            self._post(self._written, len(item))
        self._post(self._thread_done)

    def _hash_loop(self) -> None:
        while (item := self._hash_queue.get()) is not _STOP:
            if self._aborted:
                continue
            assert isinstance(item, bytes)
            self._partial.hash(item)
            self._post(self._hashed, len(item))
        self._post(self._thread_done)
