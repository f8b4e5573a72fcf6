"""`WriterSession`: a running backup as gc sees it (docs/gc.md, "Writers" and "Leases")."""

from __future__ import annotations

from snapship.repository import collection
from snapship.repository.locks import WRITER, LeaseLost, Lock
from snapship.storage.base import Storage


class WriterSession:
    """A running backup, registered so gc knows about it (docs/gc.md, "Writers" and "Leases").

    It holds a writer lock whose lease the backup must confirm before and after it writes its
    version. A lease that was lost cannot be trusted again: `renew` registers the backup anew
    (a new lock, a new session), after which the backup must re-check every chunk it relies
    on, as a writer that started during a collection does."""

    def __init__(self, storage: Storage, command: str) -> None:
        self._storage = storage
        self.command = command
        self.lock = Lock(storage, WRITER, command).acquire()
        self.collection_at_start: str | None = None
        """Id of the collection that had set chunks aside when this session began: reused
        chunks must then be re-checked before the manifest is written."""
        self.renewals = 0
        try:
            self._load_collection()
        except BaseException as e:
            self.lock.release_after(e)
            raise

    def _load_collection(self) -> None:
        pending = collection.load(self._storage)
        self.collection_at_start = pending.id if pending else None

    @property
    def id(self) -> str:
        return self.lock.session

    def confirm(self) -> bool:
        """Whether the lease has held without a gap up to now (a heartbeat is made first)."""
        return self.lock.confirm()

    def lapse(self) -> str:
        return self.lock.lapse()

    def renew(self) -> None:
        """Register again under a new session, after the lease was lost."""
        old = self.lock
        self.lock = Lock(self._storage, WRITER, self.command).acquire()
        self.renewals += 1
        old.release_after(None if old.lost is None else LeaseLost(old.lost))
        self._load_collection()

    def close(self, exc: BaseException | None) -> None:
        self.lock.release_after(exc)
