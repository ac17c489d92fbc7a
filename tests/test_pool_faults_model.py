"""The pool against the model, with failures: the pool-versus-model machine of test_pool_model
gains steps that inject an I/O error (EIO or ENOSPC at the Nth read, write or sync of the metadata
or the data file) or an interrupt (at the Nth call inside ``thinpool.metadata``) into one
operation, steps that make refused device changes, and ``clear_needs_check``.

After every fault one of two things must hold:

* the pool goes on (write mode) and every volume equals the model: the operation either happened
  or changed nothing, and every write acknowledged before it is still there (a failed write's
  own blocks may hold its old or its new bytes, as on a disk);
* or the pool is degraded (read-only with NEEDS_CHECK, or failed), ``thinpool check`` and
  ``thin_check`` pass on what is on disk, and a reopen shows the last committed state (or the
  state of the commit in flight, if its superblock had been written): volumes and mappings
  exactly, block contents as the committed ones or as written in place since.

At the end of every example both checks pass again (test_pool_model's final checks, which also
recompute every reference count).
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
import pytest
from hypothesis.stateful import invariant, rule

from thinpool import Pool, PoolMode
from thinpool.errors import (AlreadyExists, InvalidArgument, NoDataSpace, NotFound,
                             ThinpoolError)
from thinpool.tools.check import check
from tests.crash.harness import Faults, Interrupt
from tests.test_pool_model import BS, ZERO, Model, PoolMachine
from tests.tptools import requires_tools, thin_check


def _copy(vols: dict) -> dict:
    return {n: {"size": v["size"], "blocks": dict(v["blocks"]), "mapped": set(v["mapped"])}
            for n, v in vols.items()}


class TrackedModel(Model):
    """The model, remembering every version of a block written since the last commit."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[tuple[str, int], list[bytes]] = {}

    def _record(self, name: str, offset: int, length: int) -> None:
        v = self.vols[name]
        for vb in range(offset // BS, (offset + length - 1) // BS + 1):
            self.history.setdefault((name, vb), []).append(v["blocks"].get(vb, ZERO))

    def write(self, name, offset, data):
        super().write(name, offset, data)
        self._record(name, offset, len(data))

    def discard(self, name, offset, length):
        super().discard(name, offset, length)
        self._record(name, offset, length)


class FaultyPoolMachine(PoolMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = TrackedModel()
        self.committed: dict = {}
        self.extra: list[str] = []        # volumes the fault steps made (theirs to delete)
        self.faults = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def _sync_committed(self) -> None:
        """When nothing is pending in the metadata, the model is what a reopen would show."""
        if self.pool.mode <= PoolMode.OUT_OF_DATA_SPACE and not self.pool.metadata.has_changes():
            self.committed = _copy(self.model.vols)
            self.model.history = {}

    @invariant()
    def committed_tracking(self):
        self._sync_committed()

    def _disk_checks(self) -> None:
        meta = self.dir / "metadata"
        report = check(meta)
        assert report.clean, report
        r = thin_check(meta)
        assert r.returncode == 0, r.stderr

    def _allowed(self, states: list[dict], name: str, vb: int) -> list[bytes]:
        out = [s[name]["blocks"].get(vb, ZERO) for s in states if name in s]
        return out + self.model.history.get((name, vb), [])

    def _recover(self, states: list[dict], reopen: bool) -> None:
        """The pool lost its transaction (degraded, or clear_needs_check): find which state it
        shows, check every block against what it may hold, and take that as the model."""
        if reopen:
            try:
                self.pool.close()
            except ThinpoolError:
                pass
            self._disk_checks()
            self.pool = Pool.open(self.dir)
        pool = self.pool
        names = set(pool.volumes())
        shown = None
        for s in states:
            if set(s) == names and all(
                    {vb for vb, _, _ in pool.volume(n).mappings()} == s[n]["mapped"] for n in s):
                shown = s
                break
        assert shown is not None, "the pool shows none of the states it may show"
        vols = {}
        for n, mv in shown.items():
            vol = pool.volume(n)
            blocks = {}
            for vb in sorted(mv["mapped"]):
                got = vol.read(vb * BS, min(BS, vol.size - vb * BS))
                allowed = [a[: len(got)] for a in self._allowed(states, n, vb)]
                assert got in allowed, f"{n}: block {vb} holds bytes it may not hold"
                blocks[vb] = got + ZERO[len(got):]
            vols[n] = {"size": vol.size, "blocks": blocks, "mapped": set(mv["mapped"])}
        self.model.vols = vols
        self.model.history = {}
        if pool.stat().needs_check:
            pool.clear_needs_check()
        self.extra = [n for n in self.extra if n in vols]

    def _adopt_failed_write(self, name: str, offset: int, data: bytes) -> None:
        """A write failed with the pool going on: each of its blocks holds old or new bytes."""
        old = self.model.vols[name]
        new_model = Model()
        new_model.vols = _copy({name: old})
        new_model.write(name, offset, data)
        vol = self.pool.volume(name)
        mapped = {vb for vb, _, _ in vol.mappings()}
        for vb in range(offset // BS, (offset + len(data) - 1) // BS + 1):
            got = vol.read(vb * BS, min(BS, vol.size - vb * BS))
            o = old["blocks"].get(vb, ZERO)[: len(got)]
            n = new_model.vols[name]["blocks"][vb][: len(got)]
            if vb in old["mapped"] and vb in mapped:
                assert got in (o, n)
            else:
                assert vb not in mapped and got == bytes(len(got)), "a failed write mapped a block"
                continue
            if got != o:
                self.model.write(name, vb * BS, got)

    # -- fault steps ---------------------------------------------------------------------------
    def _run_faulty(self, injector, op, pool_step, model_step, states_after=None):
        """Run ``pool_step`` with ``injector`` armed; judge the outcome (see the module doc)."""
        before = _copy(self.model.vols)
        try:
            with injector:
                pool_step()
            ok = True
        except (ThinpoolError, KeyboardInterrupt):
            ok = False
        if injector.fired:
            self.faults += 1
        if ok:
            assert self.pool.mode <= PoolMode.OUT_OF_DATA_SPACE
            model_step()
            return True
        if self.pool.mode >= PoolMode.READ_ONLY:
            after = _copy(self.model.vols)
            if states_after is not None:
                states_after(after)
            self._recover([self.committed, before, after], reopen=True)
            return False
        if op[0] == "write":
            self._adopt_failed_write(*op[1:])
        return False

    def _injector(self, how, file, kind, err, nth):
        if how == "interrupt":
            return Interrupt(nth)
        if file == "metadata" and kind == "read":
            self.pool.metadata.bm.clear_cache()     # as in a large pool: blocks are read again
        # An operation makes a handful of I/O calls on each file, hundreds of metadata calls.
        return Faults(self.dir, file, kind, nth=(nth - 1) % 5 + 1, err=err)

    _how = st.sampled_from(["io", "io", "interrupt"])
    _file = st.sampled_from(["metadata", "data"])
    _kind = st.sampled_from(["read", "write", "sync"])
    _err = st.sampled_from([errno.EIO, errno.ENOSPC])

    def _pick(self, i: int) -> str | None:
        names = sorted(self.model.vols)
        return names[i % len(names)] if names else None

    @rule(i=st.integers(0, 99), how=_how, file=_file, kind=_kind, err=_err, nth=st.integers(1, 40),
          where=st.floats(0, 1), length=st.integers(1, 3 * BS), seed=st.integers(1, 255))
    def faulty_write(self, i, how, file, kind, err, nth, where, length, seed):
        name = self._pick(i)
        if name is None:
            return
        size = self.model.vols[name]["size"]
        length = min(length, size)
        offset = int(where * (size - length))
        data = bytes([seed, (seed * 7) % 256 or 1]) * (length // 2 + 1)
        data = data[:length]

        def step():
            try:
                self.pool.volume(name).write(offset, data)
            except NoDataSpace:
                if self.pool.mode < PoolMode.READ_ONLY and not getattr(inj, "fired", False):
                    raise _Skip() from None
                raise

        # A write reads metadata (and copies data); it writes and syncs only data.
        kind = "read" if file == "metadata" else "write"
        inj = self._injector(how, file, kind, err, nth)
        try:
            self._run_faulty(inj, ("write", name, offset, data), step,
                             lambda: self.model.write(name, offset, data),
                             lambda after: _write_into(after, name, offset, data))
        except _Skip:
            pass

    @rule(how=_how, file=_file, kind=_kind, err=_err, nth=st.integers(1, 40))
    def faulty_commit(self, how, file, kind, err, nth):
        self._run_faulty(self._injector(how, file, kind, err, nth), ("commit",),
                         self.pool.commit, lambda: None)

    @rule(i=st.integers(0, 99), how=_how, file=_file, kind=_kind, err=_err, nth=st.integers(1, 40))
    def faulty_snapshot(self, i, how, file, kind, err, nth):
        origin = self._pick(i)
        if origin is None:
            return
        name = self._name()

        def model_step():
            self.model.snapshot(origin, name)
            self.extra.append(name)

        def states_after(after):
            o = after[origin]
            after[name] = {"size": o["size"], "blocks": dict(o["blocks"]), "mapped": set(o["mapped"])}

        self._run_faulty(self._injector(how, file, kind, err, nth), ("snapshot",),
                         lambda: self.pool.snapshot(origin, name), model_step, states_after)

    @rule(how=_how, file=_file, kind=_kind, err=_err, nth=st.integers(1, 40),
          blocks=st.integers(1, 64))
    def faulty_create(self, how, file, kind, err, nth, blocks):
        name = self._name()
        size = blocks * BS

        def model_step():
            self.model.create(name, size)
            self.extra.append(name)

        def states_after(after):
            after[name] = {"size": size, "blocks": {}, "mapped": set()}

        self._run_faulty(self._injector(how, file, kind, err, nth), ("create",),
                         lambda: self.pool.create_thin(name, size), model_step, states_after)

    @rule(i=st.integers(0, 99), how=_how, file=_file, kind=_kind, err=_err, nth=st.integers(1, 40))
    def faulty_delete(self, i, how, file, kind, err, nth):
        if not self.extra:
            return
        name = self.extra[i % len(self.extra)]

        def model_step():
            del self.model.vols[name]
            self.extra.remove(name)

        self._run_faulty(self._injector(how, file, kind, err, nth), ("delete",),
                         lambda: self.pool.delete(name), model_step,
                         lambda after: after.pop(name, None))

    @rule(i=st.integers(0, 99), what=st.sampled_from(["dup_create", "dup_snapshot", "no_origin",
                                                      "no_volume", "zero_size", "bad_name"]))
    def refused_change(self, i, what):
        """Refused device changes change nothing, other volumes' pending writes included (the
        invariant compares every volume with the model afterwards)."""
        name = self._pick(i)
        if name is None:
            return
        calls = {
            "dup_create": (AlreadyExists, lambda: self.pool.create_thin(name, BS)),
            "dup_snapshot": (AlreadyExists, lambda: self.pool.snapshot(name, name)),
            "no_origin": (NotFound, lambda: self.pool.snapshot("missing", "x")),
            "no_volume": (NotFound, lambda: self.pool.delete("missing")),
            "zero_size": (InvalidArgument, lambda: self.pool.resize_volume(name, 0)),
            "bad_name": (InvalidArgument, lambda: self.pool.create_thin("-bad", BS)),
        }
        err, call = calls[what]
        pending = self.pool.metadata.has_changes()
        try:
            call()
        except err:
            pass
        else:
            raise AssertionError(f"{what} was not refused")
        assert self.pool.mode <= PoolMode.OUT_OF_DATA_SPACE
        assert self.pool.metadata.has_changes() == pending      # nothing committed, nothing lost

    @rule()
    def clear_needs_check(self):
        """Throws the transaction away (as leaving read-only mode does): the committed state."""
        self.pool.clear_needs_check()
        self._recover([self.committed], reopen=False)

    def teardown(self) -> None:
        type(self).total_faults += self.faults
        super().teardown()

    total_faults = 0


def _write_into(vols: dict, name: str, offset: int, data: bytes) -> None:
    m = Model()
    m.vols = vols
    m.write(name, offset, data)


class _Skip(Exception):
    """A write refused for want of space before any fault: nothing to judge."""


@requires_tools
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pool_against_model_with_faults():
    run = FaultyPoolMachine.TestCase
    run.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                            derandomize=True, suppress_health_check=list(HealthCheck))
    run().runTest()
    assert FaultyPoolMachine.total_faults > 100, FaultyPoolMachine.total_faults
