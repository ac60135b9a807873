"""A model's promotion state in object storage: the champion pointer and the append-only log.

Beside the versions ``m3i export`` writes::

    <out>/<name>/v00000300-1a2b3c4d/        an export (export.json last)
    <out>/<name>/champion.json              the pointer: the champion and how it got there
    <out>/<name>/promotions/0000000001.json the log: one immutable object per event, numbered from 1
    <out>/<name>/promotions/evals/...       re-evaluations of champions on newer eval sets

**Two promotions at once.** Object stores share one compare-and-swap: create-if-absent
(:meth:`m3i.storage.Store.put_if_absent`). A writer reads the log's last number N, decides, and
creates entry N+1; of writers racing for N+1 exactly one creates it, the others get
:class:`~m3i.promote.errors.PromotionConflict` naming the winner, having moved nothing. The log entry
is the linearisation point; ``champion.json`` is written after it, and only forward (a writer never
replaces a pointer made by a later event). Readers (:meth:`Ledger.state`) take the pointer and any
newer champion-making event of the log, so a pointer that lags (a writer between its two puts, or
one that died there) never gives a stale answer here; the next promotion rewrites it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Iterator

from m3i.promote.errors import PromotionConflict
from m3i.promote.records import ChampionRecord, Event, check_name
from m3i.storage import StorageError, join_uri, open_store

__all__ = ["EVALS", "LOG", "Ledger", "LedgerState", "POINTER"]

log = logging.getLogger(__name__)

POINTER = "champion.json"
LOG = "promotions"
EVALS = f"{LOG}/evals"
_ENTRY = re.compile(rf"^{LOG}/(\d{{10}})\.json$")


@dataclass(frozen=True)
class LedgerState:
    """What :meth:`Ledger.state` read."""

    champion: ChampionRecord | None
    last_seq: int
    """The log's last event number (0: empty)."""
    pointer_current: bool
    """Whether ``champion.json`` names the champion the log makes (False: it lags or is unreadable)."""


class Ledger:
    """The pointer and the log of one model under a models root (``export.out``)."""

    def __init__(self, models_uri: str, name: str) -> None:
        self.models_uri = models_uri
        self.name = check_name(name)
        self.uri = join_uri(models_uri, name)
        self.store = open_store(self.uri)

    @staticmethod
    def key(seq: int) -> str:
        """The log entry of event ``seq``."""
        return f"{LOG}/{seq:010d}.json"

    def seqs(self) -> list[int]:
        """Every event number in the log, ascending."""
        return sorted(int(m.group(1)) for o in self.store.list(f"{LOG}/") if (m := _ENTRY.match(o.key)))

    def event(self, seq: int) -> Event:
        """Event ``seq``; raises :class:`StorageError` when it is missing or not a promotion event."""
        raw = self.store.read_json(self.key(seq))
        try:
            return Event.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{self.store.url(self.key(seq))} is not a promotion event: {e}") from None

    def events(self, newest_first: bool = False) -> Iterator[Event]:
        """The log's events, oldest first (or newest first)."""
        for seq in sorted(self.seqs(), reverse=newest_first):
            yield self.event(seq)

    def pointer(self) -> ChampionRecord | None:
        """``champion.json`` parsed; ``None`` when absent or unreadable (logged: the log can stand in for it)."""
        if not self.store.exists(POINTER):
            return None
        try:
            return ChampionRecord.from_json(self.store.read_json(POINTER))
        except (StorageError, KeyError, TypeError, ValueError) as e:
            log.warning("%s is unreadable (%s); the champion is taken from the promotion log", self.store.url(POINTER), e)
            return None

    def state(self) -> LedgerState:
        """The champion (the pointer, or a newer champion-making event of the log) and the log's last number."""
        seqs = self.seqs()
        pointer = self.pointer()
        last = max(seqs, default=0)
        if pointer is not None and pointer.seq > last:
            log.warning("%s names event %d but the log ends at %d; was the log deleted?", self.store.url(POINTER), pointer.seq, last)
            last = pointer.seq
        newer = [s for s in seqs if pointer is None or s > pointer.seq]
        for seq in sorted(newer, reverse=True):
            champion = self.event(seq).champion
            if champion is not None:
                return LedgerState(champion, last, False)
        return LedgerState(pointer, last, pointer is not None or not self.store.exists(POINTER))

    def append(self, event: Event) -> None:
        """Record ``event`` as number ``event.seq``, if no one has.

        Raises:
            PromotionConflict: Another event took that number (it is named in the error).
        """
        key = self.key(event.seq)
        data = (json.dumps(event.to_json(), indent=1, sort_keys=True) + "\n").encode()
        created = self.store.put_if_absent(key, data, {"content-type": "application/json"})
        # Read back: a server whose conditional write is not atomic could let a later writer replace ours.
        if not created or self.store.get_bytes(key) != data:
            try:
                winner: Event | None = self.event(event.seq)
            except StorageError:
                winner = None
            raise PromotionConflict(self.name, event.seq, f"the {event.action} of {event.candidate.version}", winner)
        log.info("recorded event #%d of %s: %s %s", event.seq, self.name, event.action, event.candidate.version)

    def write_pointer(self, record: ChampionRecord) -> bool:
        """Point ``champion.json`` at ``record``, unless a later event already moved it; returns whether it was written."""
        current = self.pointer()
        if current is not None and current.seq >= record.seq:
            return False
        self.store.write_json(POINTER, record.to_json())
        return True
