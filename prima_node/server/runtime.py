"""The model behind the API: its loading state, a fair queue, cache slots, one generation at a time.

Model work (loading, tokenising, every forward pass) runs on one dedicated thread, so the event
loop keeps answering ``/health``, ``/metrics`` and new connections while a generation runs, and
two generations never interleave on the model (one sequence at a time: a CPU decode uses every
core already). Requests wait their turn in arrival order (asyncio's lock is FIFO); beyond
``queue_limit`` waiting requests the API answers 429 at once instead of letting clients time out.

Cache slots are KV-cache sessions kept between requests. Each request goes to the slot whose
cached tokens share the longest prefix with its prompt (Home Assistant resends the same long
system prompt every turn; a chat resends its history), else to the least recently used slot, so
a second client does not evict the first one's prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..generate import Event, Finished, Generator
from .protocol import RequestError

_LOG = logging.getLogger("prima.server")
T = TypeVar("T")

LOADING, READY, FAILED, STOPPING = "loading", "ready", "failed", "stopping"


@dataclass(eq=False)
class Job:
    """One admitted request: its slot and the switch that stops it from another thread."""

    slot: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    queue_wait_s: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    exc: BaseException


class Runtime:
    def __init__(self, *, queue_limit: int = 32, slots: int = 2,
                 on_change: Callable[[], None] | None = None) -> None:
        if queue_limit < 0:
            raise ValueError("the queue limit cannot be negative")
        if slots < 1:
            raise ValueError("at least one cache slot is needed")
        self.queue_limit = queue_limit
        self.slots = [f"slot{i}" for i in range(slots)]
        self.state = LOADING
        self.error: str | None = None
        self.generator: Generator | None = None
        self.model_info: dict[str, Any] = {}
        self.waiting = 0
        self.running = 0
        self._on_change = on_change or (lambda: None)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prima-model")
        self._turn = asyncio.Lock()
        self._idle_since = time.monotonic()  # when the last request let go of the model
        self._last_use = dict.fromkeys(self.slots, 0.0)
        self._key_slot: dict[str, str] = {}
        self._jobs: set[Job] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        self._on_change()

    async def load(self, open_generator: Callable[[], Generator]) -> None:
        """Load on the model thread; the API answers 503 until it is ready."""
        t0 = time.perf_counter()
        try:
            gen = await self.call(open_generator)
        except Exception as exc:
            _LOG.error("the model could not be loaded: %s", exc)
            self._set_state(FAILED, str(exc))
            return
        if self.state == STOPPING:  # shut down while loading
            await self.call(gen.close)
            return
        self.generator = gen
        describe = getattr(gen.executor, "describe", None)
        self.model_info = {**(describe() if describe else {"file": gen.path.name}),
                           "chat_template": gen.template.name,
                           "tool_format": gen.template.tool_format,
                           "can_call_tools": gen.template.tool_format is not None}
        _LOG.info("ready in %.1f s: %s (%s chat template, context %d tokens, %d cache slots)",
                  time.perf_counter() - t0, gen.path.name, gen.template.name,
                  gen.executor.n_ctx, len(self.slots))
        self._set_state(READY)

    async def close(self) -> None:
        """Stop every generation at its next token, then release the model."""
        self.state = STOPPING
        self.cancel_all()
        gen, self.generator = self.generator, None
        loop = asyncio.get_running_loop()
        if gen is not None:
            await loop.run_in_executor(self._pool, gen.close)
        await loop.run_in_executor(None, self._pool.shutdown)

    # -- the queue --------------------------------------------------------------------------------

    def require_ready(self) -> Generator:
        if self.state == READY and self.generator is not None:
            return self.generator
        if self.state == FAILED:
            raise RequestError(f"the model failed to load: {self.error}", status=503,
                               type="server_error", code="model_failed")
        if self.state == STOPPING:
            raise RequestError("the node is shutting down", status=503, type="server_error",
                               code="shutting_down")
        raise RequestError("the model is still loading; retry in a few seconds (GET /health "
                           "answers 200 once it is ready)", status=503, type="server_error",
                           code="model_loading")

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[Job]:
        """Wait for the model in arrival order; the job is this request's while it is held.

        A client that goes away while waiting leaves the queue (its handler is cancelled);
        beyond ``queue_limit`` waiting requests the answer is 429 at once.
        """
        self.require_ready()
        if self._turn.locked() and self.waiting >= self.queue_limit:
            raise RequestError(f"the node is busy: {self.waiting} requests are already "
                               f"waiting (the limit is {self.queue_limit}); retry later",
                               status=429, type="rate_limit_error", code="queue_full")
        t0 = time.perf_counter()
        self.waiting += 1
        self._on_change()
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        job = Job(queue_wait_s=time.perf_counter() - t0)
        self.running += 1
        self._jobs.add(job)
        try:
            self.require_ready()  # it may have stopped while we waited
            yield job
        finally:
            job.cancel()  # whatever is still running for it stops at its next token
            self._jobs.discard(job)
            self.running -= 1
            self._idle_since = time.monotonic()
            self._turn.release()
            self._on_change()  # the queue's figures changed: subscribers see it idle

    def _busy(self) -> bool:
        """A request runs or waits, or the model is not ready for any."""
        return self.state != READY or self._turn.locked() or bool(self.waiting)

    def idle_for(self) -> float:
        """Seconds since the last request let go of the model (0 while busy)."""
        return 0.0 if self._busy() else time.monotonic() - self._idle_since

    async def when_idle(self, fn: Callable[[], None], idle_s: float) -> bool:
        """Run ``fn`` on the model thread, holding the model's turn, if the model is ready
        and no request ran or waited for ``idle_s`` seconds (0: none runs or waits now);
        whether it ran. A request that arrives meanwhile waits for it, as for any turn."""
        if self._busy() or time.monotonic() - self._idle_since < idle_s:
            return False
        async with self._turn:
            await self.call(fn)
            self._idle_since = time.monotonic()
        return True

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the model thread (after whatever is running there)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def stop_accepting(self) -> None:
        """The node is stopping: whoever waits for a turn is told so (503) instead of served."""
        if self.state != STOPPING:
            self._set_state(STOPPING)

    def cancel_all(self) -> None:
        for job in list(self._jobs):
            job.cancel()

    def stream(self, events: Iterator[Event],
               on_finished: Callable[[Finished], None] | None = None) -> AsyncIterator[Event]:
        """Drive a generation on the model thread and hand its events to the event loop.

        Events are forwarded as soon as they are made, so a streaming client gets each token
        while the next one is computed. An exception in the generation is raised here.
        ``on_finished`` runs on the loop with the last event even when nobody reads any more
        (a client that went away), so every generation is counted.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | _End | _Failed] = asyncio.Queue()

        def put(item: Event | _End | _Failed) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def finish(ev: Finished) -> None:
            if on_finished is not None:
                on_finished(ev)  # counted before the client can see the end of its answer
            queue.put_nowait(ev)

        def pump() -> None:
            try:
                for ev in events:
                    if isinstance(ev, Finished):
                        with contextlib.suppress(RuntimeError):
                            loop.call_soon_threadsafe(finish, ev)
                    else:
                        put(ev)
            except BaseException as exc:
                put(_Failed(exc))
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()
                put(_End())

        self._pool.submit(pump)

        async def forward() -> AsyncIterator[Event]:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item

        return forward()

    # -- cache slots (called on the model thread) -------------------------------------------------

    def choose_slot(self, gen: Generator, prompt: Sequence[int], *, cache_key: str | None,
                    reuse: bool = True) -> str:
        """The slot for a prompt: the longest reusable prefix if it is at least half the prompt
        (llama.cpp's similarity rule: a shared BOS or template header is not worth evicting
        another conversation for), else this client's slot, else the least recently used."""
        keyed = self._key_slot.get(cache_key) if cache_key else None
        prefix = {s: gen.reusable_prefix(s, prompt) if reuse else 0 for s in self.slots}
        best = max(self.slots, key=lambda s: (prefix[s], -self._last_use[s]))
        if reuse and 2 * prefix[best] >= len(prompt) and prefix[best] > 0:
            slot = best
        elif keyed is not None and keyed in prefix:
            slot = keyed
        else:
            slot = min(self.slots, key=lambda s: self._last_use[s])
        self._last_use[slot] = time.monotonic()
        if cache_key:
            self._key_slot.pop(cache_key, None)
            self._key_slot[cache_key] = slot  # most recently used last
            while len(self._key_slot) > 1024:  # bounded: forget the least recently used key
                del self._key_slot[next(iter(self._key_slot))]
        return slot

    def kv_tokens(self) -> int:
        gen = self.generator
        return sum(gen.cached_tokens(s) for s in self.slots) if gen is not None else 0

    def gpu_status(self) -> dict[str, Any] | None:
        """The local model's GPU and its memory there now (None: no GPU, or no model)."""
        gen = self.generator
        status = getattr(gen.executor, "gpu_status", None) if gen is not None else None
        return status() if status is not None else None

    def kv_capacity(self) -> int:
        gen = self.generator
        return gen.executor.n_ctx * len(self.slots) if gen is not None else 0
