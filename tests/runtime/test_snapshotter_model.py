"""The snapshotter's state machine against a model (hypothesis): prepare, view, commit and
remove in random order, some of them interrupted (an exception at a chosen call of the pool or
of the records' save, before or after the call ran; then the process goes on, or restarts),
and restarts (the pool closed and
opened again, a new Snapshotter reconciling the records). After every step: the listing equals
the model (for an interrupted step, the state before it or after it, never anything else), every
runtime volume of the pool is owned by a record and every record's volume exists, and both
metadata checkers pass."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from thinpool import Pool
from thinpool.errors import ThinpoolError
from thinpool.runtime import records as rec
from thinpool.runtime.snapshotter import RuntimeOptions, Snapshotter
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
MiB = 1 << 20
KEYS = [f"k{i}" for i in range(4)]
_POOL_CALLS = ("create_thin", "snapshot", "delete", "set_read_only", "commit")


class Interrupted(BaseException):
    pass


class Cut:
    """Raise Interrupted at the ``nth`` call (0-based) of the pool's changing methods and the
    records' save, ``before`` or after the real call."""

    def __init__(self, s: Snapshotter, nth: int, before: bool):
        self.s, self.nth, self.before, self.calls = s, nth, before, 0
        self.saved = {}

    def __enter__(self):
        targets = [(self.s.pool, n) for n in _POOL_CALLS] + [(self.s.records, "save")]
        for obj, name in targets:
            real = getattr(obj, name)
            self.saved[(id(obj), name)] = (obj, name)

            def call(*a, _real=real, **kw):
                hit = self.calls == self.nth
                self.calls += 1
                if hit and self.before:
                    raise Interrupted()
                r = _real(*a, **kw)
                if hit:
                    raise Interrupted()
                return r
            setattr(obj, name, call)
        return self

    def __exit__(self, *exc):
        for obj, name in self.saved.values():
            delattr(obj, name)        # the class's method shows through again
        return False


@settings(max_examples=20, stateful_step_count=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
class SnapshotterMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model: dict[str, tuple[str, str]] = {}     # key -> (kind, parent)

    @initialize(tmp=st.just(None))
    def start(self, tmp):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="tp-rt-model-")
        self.pool = Pool.create(f"{self.dir}/p", data_size=32 * MiB, block_size=BS)
        self.s = self._snapshotter()

    def _snapshotter(self):
        return Snapshotter(self.pool, f"{self.dir}/p", None, RuntimeOptions(base_size=4 * MiB))

    def teardown(self):
        import shutil
        try:
            self.pool.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def listing(self) -> dict[str, tuple[str, str]]:
        return {i.name: (i.kind.label, i.parent) for i in self.s.walk()}

    # -- operations, each perhaps interrupted ---------------------------------------------------
    def _run(self, op, after: dict, cut):
        before = dict(self.model)
        if cut is None:
            try:
                op()
            except ThinpoolError:
                assert self.listing() == before
                return
            self.model = after
            return
        nth, early, restart = cut
        try:
            with Cut(self.s, nth, early):
                op()
        except Interrupted:
            if restart:
                self.restart()
            got = self.listing()
            assert got in (before, after), (got, before, after)
            self.model = got
            return
        except ThinpoolError:
            assert self.listing() == before
            return
        self.model = after

    cuts = st.none() | st.tuples(st.integers(0, 6), st.booleans(), st.booleans())

    @rule(key=st.sampled_from(KEYS), parent=st.just("") | st.sampled_from(KEYS), view=st.booleans(),
          cut=cuts)
    def create(self, key, parent, view, cut):
        ok = key not in self.model and (not parent or self.model.get(parent, ("",))[0] == "committed")
        after = dict(self.model)
        if ok:
            after[key] = ("view" if view else "active", parent)
        op = (lambda: self.s.view(key, parent)) if view else (lambda: self.s.prepare(key, parent))
        self._run(op, after if ok else dict(self.model), cut)
        if not ok:
            assert key not in self.model or self.listing()[key] == self.model[key]

    @rule(name=st.sampled_from(KEYS), key=st.sampled_from(KEYS), cut=cuts)
    def commit(self, name, key, cut):
        ok = self.model.get(key, ("",))[0] == "active" and name not in self.model
        after = dict(self.model)
        if ok:
            del after[key]
            after[name] = ("committed", self.model[key][1])
        self._run(lambda: self.s.commit(name, key), after, cut)

    @rule(key=st.sampled_from(KEYS), cut=cuts)
    def remove(self, key, cut):
        ok = key in self.model and not any(p == key for _, p in self.model.values())
        after = dict(self.model)
        if ok:
            del after[key]
        self._run(lambda: self.s.remove(key), after, cut)

    @rule()
    def restart(self):
        self.pool.close()
        self.pool = Pool.open(f"{self.dir}/p")
        self.s = self._snapshotter()
        assert self.s.settled and self.s.records.pending == []

    @rule()
    def settle(self):
        self.s.reconcile()
        assert self.s.settled and self.s.records.pending == []

    @rule(data=st.binary(min_size=1, max_size=3 * BS), key=st.sampled_from(KEYS))
    def write(self, data, key):
        s = self.s.records.snapshots.get(key)
        if s is not None and s["kind"] == "active":
            self.pool.volume(s["volume"]).write(BS // 2, data)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def listing_is_the_model(self):
        if hasattr(self, "s"):
            assert self.listing() == self.model

    @invariant()
    def no_orphans(self):
        if hasattr(self, "s"):
            runtime = {v for v in self.pool.volumes() if rec.is_runtime_volume(v)}
            records = self.s.records
            # Every runtime volume is owned (by a snapshot or, until the next operation settles
            # what an interrupted one left, by a pending record), every snapshot's volume exists.
            pending = {p["volume"] for p in records.pending}
            assert runtime <= records.owned_volumes()
            assert records.owned_volumes() - runtime <= pending
            if self.s.settled:
                assert records.pending == []
                for s in records.snapshots.values():
                    assert self.pool.volume(s["volume"]).read_only == (s["kind"] != "active")

    @invariant()
    def checkers_pass(self):
        if hasattr(self, "s"):
            self.pool.commit()
            assert_checks_pass(self.pool.stat().metadata_path)


@requires_tools
@pytest.mark.slow
def test_snapshotter_state_machine():
    SnapshotterMachine.TestCase().runTest()
