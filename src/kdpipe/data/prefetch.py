"""The training loop's batches, assembled ahead of time in a background thread.

:class:`BatchStream` runs the host part of the next ``depth`` batches (draw the indices and views,
gather the rows) in a thread while the device computes the current step; the device part (copy,
layout, augment) stays on the training thread. :meth:`BatchStream.stop` puts the random streams
back to just after the last consumed batch, so checkpoints and resumes are those of a run without
prefetch. A batch drawn with outdated view probabilities (its ``draw_key``) is drawn again.

Design notes: docs/data-path.md.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

THREAD_NAME = "kdpipe-prefetch"


@dataclass
class _Drawn:
    """One batch's host part, with what it was drawn under and the random streams' state after it."""

    host: Any  # views.HostBatch
    key: Any
    state_after: dict[str, Any]


@dataclass
class _Failed:
    """An exception raised in the thread, re-raised on the training thread when it gets there."""

    error: BaseException


class BatchStream:
    """The loop's source of batches: ``next()`` gives the next :class:`kdpipe.training.views.Batch`.

    Outside :meth:`prefetching` (or with ``depth`` 0) every batch is drawn on the calling thread
    when it is asked for. Inside, a thread keeps up to ``depth`` batches ready.
    """

    def __init__(self, sampler, views, depth: int = 2):
        self.sampler, self.views, self.depth = sampler, views, depth
        self._wanted = False  # inside prefetching(): (re)start the thread when a batch is asked for
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._halt = threading.Event()
        self._key: Any = None  # the draw key the thread draws under
        self._consumed: dict[str, Any] | None = None  # the streams' state after the last batch taken

    # ------------------------------------------------------------------------------ the streams' state
    def _state(self) -> dict[str, Any]:
        views = self.views.state_dict() if hasattr(self.views, "state_dict") else None
        return {"sampler": self.sampler.state_dict(), "views": views}

    def _restore(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if state["views"] is not None:
            self.views.load_state_dict(state["views"])

    def _draw(self, key: Any) -> _Drawn:
        l_idx, u_idx = self.sampler.next()
        host = self.views.host(l_idx, u_idx, key)
        return _Drawn(host, key, self._state())

    # ------------------------------------------------------------------------------ the training thread
    def next(self):
        """The next batch, on the device (called on the training thread)."""
        key = self.views.draw_key()
        if not self._wanted or self.depth <= 0:
            return self.views.on_device(self.views.host(*self.sampler.next(), key))
        drawn = self._take(key)
        if drawn.key != key:  # the schedule moved since it was drawn: draw it (and the ones after) again
            self.stop()
            drawn = self._take(key)
        self._consumed = drawn.state_after
        return self.views.on_device(drawn.host)

    def _take(self, key: Any) -> _Drawn:
        if self._thread is None:
            self._start(key)
        item = self._queue.get()
        if isinstance(item, _Failed):
            self.stop()
            raise item.error
        return item

    def prefetching(self) -> _Prefetching:
        """``with stream.prefetching():`` batches are drawn ahead inside; the thread is stopped (and the
        streams put back to the last consumed batch) on leaving, however the block ends."""
        return _Prefetching(self)

    def _start(self, key: Any) -> None:
        self._consumed = self._state()
        self._key = key
        self._queue = queue.Queue(maxsize=self.depth)
        self._halt.clear()
        self._thread = threading.Thread(target=self._fill, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, drop the batches drawn but not consumed, and put the sampler and the view
        chooser back to the state right after the last consumed batch (what a checkpoint must hold)."""
        if self._thread is not None:
            self._halt.set()
            self._drain()  # a thread blocked on a full queue gets room, sees the halt and returns
            self._thread.join()
            self._drain()
            self._thread = None
        if self._consumed is not None:
            self._restore(self._consumed)
            self._consumed = None  # the live streams are the consumed state again

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # ------------------------------------------------------------------------------ the background thread
    def _fill(self) -> None:
        """Draw batches until halted; at most one more is put after the halt, into a drained queue."""
        try:
            while not self._halt.is_set():
                self._queue.put(self._draw(self._key))
        except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
            self._queue.put(_Failed(error))


class _Prefetching:
    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __enter__(self) -> BatchStream:
        self.stream._wanted = True
        return self.stream

    def __exit__(self, *exc_info) -> None:
        self.stream._wanted = False
        self.stream.stop()
