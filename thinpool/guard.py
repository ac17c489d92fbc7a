"""One operation at a time on a pool, and what an exception inside one may leave behind.

:class:`OperationGuard` owns a pool's mutex and its failure rule. Every public operation of a
``Pool`` or ``Volume`` runs inside :meth:`OperationGuard.operation`; nested operations (a discard
that writes its partial edges, a device change that zeroes a tail) join the outer one, and only
the outer one judges an exception:

* **Intact.** If the metadata did not change since the operation began
  (:meth:`ThinMetadata.intact_since`, which also accepts a commit made by the operation followed
  by a rollback to it), the exception goes up as it is and the pool goes on: the transaction,
  with every write acknowledged before the operation, is exactly as it was.
* **Degraded.** Otherwise, or when the exception reports damaged metadata or a metadata I/O
  error, the pool does what the kernel's ``metadata_operation_failed`` does: the transaction is
  aborted and NEEDS_CHECK is written (the pool is read-only until a check); if even that fails the
  pool is failed (:attr:`failed`). Out of metadata space keeps its own message (grow, then check).
  A half-done change is never committed: the abort threw it away.

* **Read-only pools** have nothing to protect; damaged metadata one of their operations runs
  into is passed to ``on_damage`` (the pool marks itself for a check, see damage.py) and goes up
  as it is.

:attr:`degraded` and :attr:`failed` say why, for ``stat``. :meth:`wait` releases the mutex while
a writer waits for data space, as an operation that has changed nothing yet: the others run
meanwhile as outer operations of their own, and the waiter's operation starts afresh.

The guard keeps no reference to the metadata: it asks its owner for the current one each time.
Nothing here prints.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import IncompatibleMetadata, MetadataError, MetadataIOError, NoMetadataSpace


class OperationGuard:
    def __init__(self, metadata: Callable[[], object | None], name: Callable[[], str],
                 on_damage: Callable[[BaseException], object] | None = None):
        """``metadata()`` is the pool's open, writable metadata (None when it is closed or open
        read-only: then there is nothing to protect); ``name()`` the pool's name for messages;
        ``on_damage(e)`` is told of damaged metadata an operation of a read-only pool ran into
        (it marks the pool for a check, see damage.py)."""
        self._metadata = metadata
        self._name = name
        self._on_damage = on_damage
        self.mutex = threading.RLock()
        self.space = threading.Condition(self.mutex)     # notified when data space may be free
        self._depth = 0                    # nesting, for the thread holding the mutex
        self._mark: tuple[int, int] | None = None
        self.failed: str | None = None     # why the pool is in FAIL mode
        self.degraded: str | None = None   # why this process made it read-only

    @property
    def nested(self) -> bool:
        """True inside an operation that runs within another (it must not wait)."""
        return self._depth > 1

    @contextmanager
    def operation(self) -> Iterator[None]:
        with self.mutex:
            outer = self._depth == 0
            if outer:           # (an interrupt in here has changed nothing, depth included)
                meta = self._metadata()
                self._mark = None if meta is None else meta.mark()
            self._depth += 1
            try:
                yield
            except BaseException as e:
                if outer:
                    replacement = self._failed_with(e)
                    if replacement is not None:
                        raise replacement from None
                raise
            finally:
                self._depth -= 1

    def _failed_with(self, e: BaseException) -> BaseException | None:
        """Degrade the pool if ``e`` left anything half done or reports damage; returns the
        exception to raise instead, if any."""
        meta = self._metadata()
        if isinstance(e, IncompatibleMetadata):
            return None
        if meta is None:
            if isinstance(e, MetadataError) and self._on_damage is not None:
                self._on_damage(e)          # a reader: nothing to protect, but remember it
            return None
        if self._mark is None:
            return None
        damage = isinstance(e, (MetadataError, MetadataIOError))
        if meta.intact_since(self._mark) and not damage:
            return None
        name = self._name()
        if isinstance(e, NoMetadataSpace):
            self.degrade(f"out of metadata space: {e}")
            return NoMetadataSpace(
                f"pool {name} ran out of metadata space ({e}); the transaction was rolled "
                f"back and the pool is read-only: grow it with 'thinpool resize {name} "
                f"--metadata-size SIZE', then run 'thinpool check {name}'")
        what = ("a metadata I/O error" if isinstance(e, MetadataIOError) else
                "damaged metadata" if damage else "a failure inside a metadata change")
        self.degrade(f"{what} ({type(e).__name__}: {e}); the uncommitted transaction was "
                     f"rolled back")
        return None

    def degrade(self, why: str) -> None:
        """The kernel's metadata_operation_failed: abort the transaction, record NEEDS_CHECK and
        refuse writes; FAIL mode when even that cannot be done."""
        if self.failed:
            return
        if self.degraded is None:
            self.degraded = why
        meta = self._metadata()
        if meta is None:
            return
        try:
            meta.set_needs_check(True)
        except BaseException as err:  # noqa: BLE001 - the pool cannot even record its trouble
            self.failed = f"{why}; and NEEDS_CHECK could not be recorded: {err}"

    def recovered(self) -> None:
        """NEEDS_CHECK was cleared after a check: the pool takes writes again."""
        self.degraded = None

    def wait(self, timeout: float) -> None:
        """Wait for data space with the mutex released (call it from an outer operation that
        has changed nothing); the operation then starts afresh."""
        self._depth = 0
        try:
            self.space.wait(timeout)
        finally:
            self._depth = 1
            meta = self._metadata()
            self._mark = None if meta is None else meta.mark()
