"""Places for connections still proving the cluster secret, that a stranger cannot keep.

Anyone who reaches a node's port can open websockets and never answer the challenge. Each
such connection costs a socket and a buffer up to the largest frame, so the places are
capped (``MAX_UNADMITTED``, of which ``MAX_UNADMITTED_PER_PEER`` from one address). A cap
alone is a lock the stranger holds: sixteen idle sockets that answer pings would keep every
real node out. So a handshake has a wall-clock deadline (``auth.accept``), and when the
places are full a newcomer takes the place of the oldest handshake that has had
``EVICT_AFTER_S`` to finish: a real node proves the secret in one round trip, far within
that, so a node is only turned away while someone opens connections faster than that, from
many addresses at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

MAX_UNADMITTED = 16  # connections still proving the secret
#: of those, from one address: one misbehaving device cannot take every place and keep the
#: real nodes out (a head opens at most two at once to a node: control and a link probe)
MAX_UNADMITTED_PER_PEER = 4
EVICT_AFTER_S = 2.0  # a handshake this old gives its place to a newcomer when none is free


class AdmissionBusyError(Exception):
    """Every place holds a handshake younger than ``EVICT_AFTER_S``: try again shortly."""


@dataclass(eq=False)
class Place:
    """One handshake's place. ``hold`` is the deadline the handshake runs under: eviction
    moves it to now, which cancels the handshake wherever it waits."""

    remote: str
    since: float
    hold: asyncio.Timeout | None = None
    evicted: bool = False


class Admission:
    """The places, and who holds them (event loop only)."""

    def __init__(self, limit: int = MAX_UNADMITTED, per_peer: int = MAX_UNADMITTED_PER_PEER,
                 evict_after_s: float = EVICT_AFTER_S) -> None:
        self.limit, self.per_peer, self.evict_after_s = limit, per_peer, evict_after_s
        self.places: list[Place] = []  # oldest first

    def count(self, remote: str | None = None) -> int:
        return sum(1 for p in self.places if remote is None or p.remote == remote)

    def by_address(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.places:
            counts[p.remote] = counts.get(p.remote, 0) + 1
        return counts

    def claim(self, remote: str) -> Place:
        """A place for a handshake from ``remote``, evicting the oldest one that had its time
        if there is none free; AdmissionBusyError if every place is younger than that."""
        if self.count(remote) >= self.per_peer:
            self._evict([p for p in self.places if p.remote == remote], remote)
        elif len(self.places) >= self.limit:
            self._evict(self.places, remote)
        place = Place(remote, time.monotonic())
        self.places.append(place)
        return place

    def release(self, place: Place) -> None:
        if place in self.places:
            self.places.remove(place)

    def _evict(self, candidates: list[Place], remote: str) -> None:
        oldest = candidates[0]  # the list is oldest first
        if time.monotonic() - oldest.since < self.evict_after_s:
            raise AdmissionBusyError(f"{len(self.places)} connections ({self.count(remote)} from "
                                f"{remote}) are still proving the secret")
        oldest.evicted = True
        self.places.remove(oldest)
        if oldest.hold is not None:
            oldest.hold.reschedule(asyncio.get_running_loop().time())
