"""A private containerd daemon for the container-runtime tests, and its complete clean-up.

``Containerd(snapshotter_socket=None)`` makes a short temporary directory ``/tmp/tpctr-<pid>-XXXX``
(Unix socket paths must stay under 108 bytes) and nothing else. ``start()`` writes a version-2
config there (root, state, the gRPC/ttrpc/debug sockets, the ``opt`` plugin's directory, the log:
all inside that directory; the CRI plugin disabled; a proxy snapshotter plugin named ``thinpool``
at ``snapshotter_socket``, by default ``<dir>/thinpool.sock``), starts ``containerd --config FILE``
with its output in ``<dir>/containerd.log`` and returns once ``ctr version`` answers. Nothing need
listen on the snapshotter socket: containerd dials it lazily, and a call that reaches it while
nobody listens fails with ``unavailable`` (see ``wait_snapshotter``).

``ctr(*args, namespace=..., check=True, timeout=...)`` runs ``ctr --address SOCK -n NS ARGS`` and
returns the ``CompletedProcess`` (text); with ``check`` a non-zero exit raises ``AssertionError``
carrying the command and its stderr; a timeout always raises ``AssertionError`` (the ``ctr`` client
is killed, what it started is left to ``stop``). For ``run``, ``tasks start`` and ``tasks exec``
it adds ``--fifo-dir <dir>/fifo`` so that the I/O FIFOs are not made under ``/run/containerd``.

``stop()`` is idempotent and safe in ``finally`` whatever state ``start`` reached. In order, it:
removes every task and container of this instance (when the daemon still answers); sends SIGTERM to
containerd by pid, waits, then SIGKILL; SIGKILLs the ``containerd-shim-runc-v2`` processes whose
``-address`` is this instance's socket, the processes with an argument that is one of its sockets,
its config or a path under its root or state (runc, ``ctr`` clients), and all their descendants
(the containers' processes); unmounts every mount under the directory, deepest first (``umount``,
then ``umount -l`` as the last resort); removes what the shim and runc left under
``/run/containerd`` (they use it whatever the config says) that provably belongs to this
instance: runc state directories ``runc/NS/ID`` whose ``state.json`` names this instance's
directory, shim sockets ``s/<sha256(address/NS/ID)>`` for the ids seen in its namespaces, then the
``runc/NS`` directories of its namespaces when empty, then ``runc``, ``s``, ``fifo`` and
``/run/containerd`` itself when empty and absent before ``start`` (``rmdir`` only: another
daemon's entries are never touched); ``rmdir``s the empty cgroup directories ``<cgroup
mount>/NS[/ID]`` runc leaves for its namespaces; and removes the temporary directory (with
``snapshotter_socket`` when it lies there). It does not stop a snapshotter listening on
``snapshotter_socket``: that is the snapshotter's fixture's job. Whatever could not be removed is
reported by ``leftovers()``, and ``stop`` raises ``AssertionError`` listing it after doing all
steps (``stop(check=False)`` does not).

A namespace is this instance's once a ``ctr`` call named it (or the daemon lists it at ``stop``);
``clear_namespace(ns)`` empties and removes one while the daemon runs, and
``namespace_leftovers(ns)`` / ``wait_namespace_clean(ns)`` say what of it is still there.

A failure midway through ``stop`` (a mount that will not go, a process in uninterruptible sleep)
leaves exactly what ``leftovers()`` names. A test process killed before ``stop`` leaves the daemon,
its shims and mounts behind; a later ``Containerd`` does not adopt them.

Processes in state Z count as gone: on this machine pid 1 reaps orphans (exited shims) a little
later, so ``ps`` may show ``[containerd-shim] <defunct>`` for a moment.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Containerd", "RUN_DIR", "assert_no_mounts", "missing_tools", "mounts_under",
           "proc_table", "skip_reason", "tool_env"]

RUN_DIR = Path("/run/containerd")     # where the shim and runc keep state regardless of config
SHIM = "containerd-shim-runc-v2"
TASK_DIR = "io.containerd.runtime.v2.task"
_FIFO_COMMANDS = {("run",), ("tasks", "start"), ("tasks", "exec"), ("task", "start"),
                  ("task", "exec"), ("t", "start"), ("t", "exec")}


def tool_env() -> dict[str, str]:
    """This process's environment with the sbin directories on PATH (Debian's runc is
    /usr/sbin/runc; containerd finds the shim and the shim finds runc through PATH)."""
    env = dict(os.environ)
    path = env.get("PATH", "").split(":")
    path += [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin")
             if d not in path]
    env["PATH"] = ":".join(p for p in path if p)
    return env


def missing_tools() -> list[str]:
    """What the real-containerd tests need and this machine lacks (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    path = tool_env()["PATH"]
    missing += [t for t in ("containerd", "ctr", "runc", SHIM)
                if shutil.which(t, path=path) is None]
    return missing


def skip_reason() -> str | None:
    """Why the real-containerd tests cannot run here (for ``pytest.skip``), or None."""
    missing = missing_tools()
    if "root" in missing:
        return "containerd tests need root"
    if missing:
        return f"{', '.join(missing)} not installed (Debian: containerd runc)"
    return None


def assert_no_mounts(directory: str | os.PathLike) -> None:
    """Fail when a line of /proc/mounts names ``directory``."""
    with open("/proc/mounts") as f:
        left = [line for line in f if str(directory) in line]
    assert left == [], f"mounts left under {directory}: {left}"


def proc_table() -> dict[int, tuple[int, str, list[str]]]:
    """pid -> (ppid, state, argv) of every process now, from /proc (processes that vanish while
    it is read are left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        table[int(name)] = (int(rest[1]), rest[0], argv)
    return table


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(directory: str | os.PathLike) -> list[str]:
    """Mount points at or under ``directory`` in this mount namespace (/proc/self/mountinfo), one
    per mount (a point mounted twice is listed twice), in mount order."""
    d = str(directory).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == d or point.startswith(d + "/"):
                out.append(point)
    return out


def _cgroup_mounts() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] in ("cgroup", "cgroup2") and fields[3] == "/":
                points.append(_unescape(fields[4]))
    return points


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids if _alive(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.02)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Containerd:
    """One private containerd daemon; see the module docstring for the whole contract."""

    def __init__(self, snapshotter_socket: str | os.PathLike | None = None, *,
                 log_level: str = "info") -> None:
        if snapshotter_socket is not None and len(os.fsencode(snapshotter_socket)) > 107:
            raise ValueError(f"socket path longer than 107 bytes: {snapshotter_socket}")
        self.dir = Path(tempfile.mkdtemp(prefix=f"tpctr-{os.getpid()}-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "containerd.sock")
        self.ttrpc_address = str(self.dir / "containerd.sock.ttrpc")
        self.debug_address = str(self.dir / "debug.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.fifo_dir = self.dir / "fifo"
        self.snapshotter_socket = str(snapshotter_socket or self.dir / "thinpool.sock")
        self.log_level = log_level
        self._env = tool_env()
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.namespaces: set[str] = set()
        self._tokens: dict[str, set[str]] = {}       # namespace -> words seen in its ctr calls
        self._run_dirs_before: set[str] | None = None     # set by start
        self.start_seconds: float | None = None

    # -- life --------------------------------------------------------------------------------

    def config_text(self) -> str:
        def q(s: str | Path) -> str:
            return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "\n".join([
            "version = 2",
            f"root = {q(self.root)}",
            f"state = {q(self.state)}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "",
            "[grpc]",
            f"  address = {q(self.address)}",
            "[ttrpc]",
            f"  address = {q(self.ttrpc_address)}",
            "[debug]",
            f"  address = {q(self.debug_address)}",
            f"  level = {q(self.log_level)}",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(self.dir / 'opt')}",
            "[proxy_plugins.thinpool]",
            '  type = "snapshot"',
            f"  address = {q(self.snapshotter_socket)}",
            "",
        ])

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until ``ctr version`` answers; raises RuntimeError with the
        log's tail when it exits or does not answer within ``timeout`` (call ``stop`` anyway)."""
        if self.proc is not None:
            raise RuntimeError("already started")
        self._run_dirs_before = {str(p) for p in self._run_dirs() if p.exists()}
        self.config_path.write_text(self.config_text())
        self.fifo_dir.mkdir(exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self._env)
        self.pid = self.proc.pid
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                r = subprocess.run(["ctr", "--address", self.address, "version"],
                                   capture_output=True, text=True, timeout=5, env=self._env)
                if r.returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"containerd did not answer within {timeout} s:\n"
                                   + self.log_tail())
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop(check=exc[0] is None)

    # -- ctr ---------------------------------------------------------------------------------

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 60.0, input: str | None = None,
            _record: bool = True) -> subprocess.CompletedProcess:
        """Run ``ctr --address SOCK -n NAMESPACE ARGS``; see the module docstring. Every
        namespace named here counts as this instance's (``stop`` cleans it)."""
        args = tuple(str(a) for a in args)
        if "--fifo-dir" not in args:
            for n in (2, 1):
                if tuple(args[:n]) in _FIFO_COMMANDS:
                    args = args[:n] + ("--fifo-dir", str(self.fifo_dir)) + args[n:]
                    break
        if _record:
            self.namespaces.add(namespace)
            self._tokens.setdefault(namespace, set()).update(
                a for a in args if not a.startswith("-"))
        cmd = ["ctr", "--address", self.address, "-n", namespace, *args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                               stdin=None if input is not None else subprocess.DEVNULL,
                               env=self._env)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            raise AssertionError(f"{' '.join(cmd)}: no answer within {timeout} s; stderr: "
                                 f"{err or ''}") from None
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}: "
                                 f"{r.stderr.strip()}")
        return r

    def wait_snapshotter(self, timeout: float = 15.0, namespace: str = "tpctr-probe") -> float:
        """Wait until a call reaches the proxy snapshotter: Prepare a probe snapshot and remove it,
        retried (containerd's reconnect backoff to a late or restarted snapshotter is capped at
        about 3 s). Returns the seconds waited; raises AssertionError with the last error."""
        t0 = time.monotonic()
        key = f"probe-{os.getpid()}-{time.monotonic_ns()}"
        while True:
            r = self.ctr("snapshots", "--snapshotter", "thinpool", "prepare", key,
                         namespace=namespace, check=False, timeout=10)
            if r.returncode == 0:
                self.ctr("snapshots", "--snapshotter", "thinpool", "rm", key,
                         namespace=namespace, timeout=10)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the thinpool snapshotter is not reachable: {r.stderr}")
            time.sleep(0.05)

    # -- what belongs to this instance -------------------------------------------------------

    def _run_dirs(self) -> list[Path]:
        return [RUN_DIR / "runc", RUN_DIR / "s", RUN_DIR / "fifo", RUN_DIR]

    def _refers_to_us(self, argv: list[str]) -> bool:
        if argv and os.path.basename(argv[0]) == SHIM:
            return _arg(argv, "-address") == self.address
        exact = {self.address, self.ttrpc_address, self.debug_address, str(self.config_path)}
        under = (str(self.state) + "/", str(self.root) + "/")
        return any(a in exact or a.startswith(under) for a in argv)

    def processes(self, namespace: str | None = None) -> dict[int, list[str]]:
        """pid -> argv of the live processes of this instance (only those of ``namespace``'s
        shims when given), and all their descendants (the containers' processes): the daemon;
        the shims whose ``-address`` is its socket; processes with an argument that is one of
        its sockets or its config (``ctr`` clients) or a path under its root or state (runc).
        A process that merely names ``snapshotter_socket`` (the snapshotter) is not one."""
        table = proc_table()
        me = os.getpid()
        roots = set()
        for pid, (_ppid, state, argv) in table.items():
            if pid == me or state in ("Z", "X"):
                continue
            if namespace is not None:
                if (argv and os.path.basename(argv[0]) == SHIM and _arg(argv, "-address")
                        == self.address and _arg(argv, "-namespace") == namespace):
                    roots.add(pid)
            elif pid == self.pid or self._refers_to_us(argv):
                roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _s, _a) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            todo.extend(children.get(pid, []))
        return {pid: table[pid][2] for pid in sorted(found)
                if pid != me and table[pid][1] not in ("Z", "X")}

    def _shim_ids(self) -> set[tuple[str, str]]:
        pairs = set()
        for _pid, (_ppid, _state, argv) in proc_table().items():
            if (argv and os.path.basename(argv[0]) == SHIM
                    and _arg(argv, "-address") == self.address):
                ns, cid = _arg(argv, "-namespace"), _arg(argv, "-id")
                if ns and cid:
                    pairs.add((ns, cid))
        return pairs

    def _state_ids(self) -> set[tuple[str, str]]:
        pairs = set()
        base = self.state / TASK_DIR
        try:
            for ns in os.listdir(base):
                for cid in os.listdir(base / ns):
                    pairs.add((ns, cid))
        except OSError:
            pass
        return pairs

    def _candidates(self) -> dict[str, set[str]]:
        """namespace -> every word that may be a container id of this instance there."""
        cands = {ns: set(words) for ns, words in self._tokens.items()}
        for ns, cid in self._shim_ids() | self._state_ids():
            cands.setdefault(ns, set()).add(cid)
        for ns in self.namespaces:
            cands.setdefault(ns, set())
        return cands

    def _shim_socket(self, namespace: str, cid: str) -> Path:
        h = hashlib.sha256(os.path.join(self.address, namespace, cid).encode()).hexdigest()
        return RUN_DIR / "s" / h

    def _runc_ours(self, entry: Path, known: set[str]) -> bool:
        try:
            return str(self.dir) + "/" in (entry / "state.json").read_text(errors="replace")
        except FileNotFoundError:
            return entry.name in known
        except OSError:
            return False

    def run_entries(self, namespace: str | None = None) -> list[Path]:
        """What under /run/containerd belongs to this instance (to ``namespace`` only when
        given): runc state directories and shim sockets."""
        out = []
        for ns, cands in self._candidates().items():
            if namespace is not None and ns != namespace:
                continue
            runc = RUN_DIR / "runc" / ns
            try:
                entries = sorted(runc.iterdir())
            except OSError:
                entries = []
            out += [e for e in entries if self._runc_ours(e, cands)]
            out += [p for p in (self._shim_socket(ns, c) for c in sorted(cands))
                    if os.path.lexists(p)]
        return out

    def cgroup_dirs(self, namespace: str) -> list[Path]:
        """The cgroup directories ``<cgroup mount>/NAMESPACE`` that exist (runc makes them for the
        containers of that namespace and leaves them when the containers go)."""
        return [Path(m) / namespace for m in _cgroup_mounts() if (Path(m) / namespace).is_dir()]

    def namespace_leftovers(self, namespace: str) -> list[str]:
        """What of ``namespace`` is still there while the daemon runs: tasks and containers,
        shim processes and their descendants, mounts of its tasks, /run/containerd entries, and
        its empty runc/NS and cgroup directories. Empty when the namespace is clean."""
        left = []
        if self.proc is not None and self.proc.poll() is None:
            for what in ("tasks", "containers"):
                r = self.ctr(what, "ls", "-q", namespace=namespace, check=False, timeout=10)
                left += [f"{what[:-1]} {line}" for line in r.stdout.split() if line]
        left += [f"process {pid}: {' '.join(argv)}"
                 for pid, argv in self.processes(namespace).items()]
        left += [f"mount {m}" for m in mounts_under(self.state / TASK_DIR / namespace)]
        left += [f"run entry {p}" for p in self.run_entries(namespace)]
        if (RUN_DIR / "runc" / namespace).is_dir():
            left.append(f"run dir {RUN_DIR / 'runc' / namespace}")
        left += [f"cgroup {p}" for p in self.cgroup_dirs(namespace)]
        return left

    def wait_namespace_clean(self, namespace: str, timeout: float = 5.0) -> list[str]:
        """Poll ``namespace_leftovers`` until it is empty or ``timeout`` passes (a shim exits a
        moment after its task is deleted); returns the last list."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.namespace_leftovers(namespace)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def leftovers(self) -> list[str]:
        """Everything of this instance still there after ``stop`` (empty when all is gone)."""
        left = [f"process {pid}: {' '.join(argv)}" for pid, argv in self.processes().items()]
        left += [f"mount {m}" for m in mounts_under(self.dir)]
        left += [f"run entry {p}" for p in self.run_entries()]
        for ns in sorted(self.namespaces):
            if (RUN_DIR / "runc" / ns).is_dir():
                left.append(f"run dir {RUN_DIR / 'runc' / ns}")
            left += [f"cgroup {p}" for p in self.cgroup_dirs(ns)]
        if self.dir.exists():
            left.append(f"directory {self.dir}")
        return left

    # -- clean-up ----------------------------------------------------------------------------

    def clear_namespace(self, namespace: str, timeout: float = 20.0) -> None:
        """Remove every task, container and image of ``namespace``, then the namespace itself,
        then its empty runc/NS and cgroup directories. containerd's garbage collection removes the
        content and snapshots, and does not always run soon after a deletion (seen: blobs and
        snapshots of an image removed 20 s earlier, no lease left): the images go with
        ``--sync``, and while the namespace is not removable a lease is created and deleted with
        ``--sync``, which runs a collection. Raises AssertionError, naming what is left, when
        the namespace is still not removable after ``timeout``."""
        self._remove_containers(namespace)
        r = self.ctr("images", "ls", "-q", namespace=namespace, check=False, timeout=30)
        images = r.stdout.split()
        if images:
            self.ctr("images", "rm", "--sync", *images, namespace=namespace, check=False,
                     timeout=60)
        deadline = time.monotonic() + timeout
        while True:
            r = self.ctr("namespaces", "rm", namespace, check=False, timeout=30, _record=False)
            ls = self.ctr("namespaces", "ls", "-q", check=False, timeout=30, _record=False)
            if namespace not in ls.stdout.split():
                break
            if time.monotonic() >= deadline:
                what = [f"namespace {namespace} not removable: {r.stderr.strip()}"]
                for cmd in (("leases", "ls"), ("snapshots", "ls"), ("content", "ls"),
                            ("images", "ls"), ("containers", "ls")):
                    out = self.ctr(*cmd, namespace=namespace, check=False, timeout=30)
                    what.append(f"ctr {' '.join(cmd)}:\n{out.stdout}{out.stderr}")
                raise AssertionError("\n".join(what))
            lease = f"tpctr-gc-{time.monotonic_ns()}"
            if self.ctr("leases", "create", "--id", lease, namespace=namespace, check=False,
                        timeout=30).returncode == 0:
                self.ctr("leases", "rm", "--sync", lease, namespace=namespace, check=False,
                         timeout=60)
            time.sleep(0.05)
        self._remove_namespace_dirs(namespace)

    def _remove_containers(self, namespace: str) -> None:
        r = self.ctr("containers", "ls", "-q", namespace=namespace, check=False, timeout=30)
        t = self.ctr("tasks", "ls", "-q", namespace=namespace, check=False, timeout=30)
        for cid in sorted(set(r.stdout.split()) | set(t.stdout.split())):
            self.ctr("tasks", "rm", "-f", cid, namespace=namespace, check=False, timeout=30)
            self.ctr("containers", "rm", cid, namespace=namespace, check=False, timeout=30)

    def _remove_namespace_dirs(self, namespace: str) -> None:
        _rmdir(RUN_DIR / "runc" / namespace)
        for p in self.cgroup_dirs(namespace):
            _rmdir_tree(p)

    def stop(self, check: bool = True) -> None:
        """Stop and remove everything of this instance (module docstring). Every step runs even
        when an earlier one raised; the first such error is raised at the end. With ``check``,
        raise AssertionError listing ``leftovers()`` when something could not be removed."""
        errors: list[BaseException] = []
        for step in (self._stop_containers, self._stop_daemon, self._kill_processes,
                     self._unmount_all, self._clean_run_and_cgroups, self._remove_dir):
            try:
                step()
            except Exception as e:          # noqa: BLE001 - keep cleaning, report afterwards
                errors.append(e)
        if errors:
            raise errors[0]
        if check:
            left = self.leftovers()
            if left:
                raise AssertionError("containerd instance not fully removed:\n  "
                                     + "\n  ".join(left))

    def _stop_containers(self) -> None:
        """1. the tasks and containers the daemon knows of, while it still answers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            r = self.ctr("namespaces", "ls", "-q", check=False, timeout=15, _record=False)
            self.namespaces.update(r.stdout.split())
            for ns in sorted(self.namespaces):
                self._remove_containers(ns)
        except AssertionError:
            pass                            # a daemon that does not answer: later steps do it

    def _stop_daemon(self) -> None:
        """2. SIGTERM by pid, wait, SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _kill_processes(self) -> None:
        """3. shims, runc, clients and the containers' processes (ids noted for step 5)."""
        for ns, cid in self._shim_ids() | self._state_ids():
            self.namespaces.add(ns)
            self._tokens.setdefault(ns, set()).add(cid)
        for _ in range(3):
            procs = self.processes()
            if not procs:
                return
            for pid in procs:
                _kill(pid, signal.SIGKILL)
            _wait_gone(procs, timeout=10)

    def _clean_run_and_cgroups(self) -> None:
        """5. /run/containerd and cgroups: only what is provably this instance's."""
        for entry in self.run_entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass
        for ns in sorted(self.namespaces):
            self._remove_namespace_dirs(ns)
        if self._run_dirs_before is not None:
            for d in self._run_dirs():
                if str(d) not in self._run_dirs_before:
                    _rmdir(d)

    def _remove_dir(self) -> None:
        """6. the temporary directory, unless something is still mounted in it."""
        if self.dir.exists() and not mounts_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _unmount_all(self) -> None:
        """4. every mount under the directory, deepest first; ``umount -l`` when umount fails."""
        for _ in range(10):
            points = mounts_under(self.dir)
            if not points:
                return
            for point in sorted(set(points), key=lambda p: (p.count("/"), p), reverse=True):
                r = subprocess.run(["umount", point], capture_output=True, timeout=60,
                                   env=self._env)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True, timeout=60,
                                   env=self._env)


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a in (flag, "-" + flag):
            return argv[i + 1]
    for a in argv:
        for f in (flag, "-" + flag):
            if a.startswith(f + "="):
                return a[len(f) + 1:]
    return None


def _rmdir(path: Path) -> bool:
    """rmdir ``path``; False when it is not there, not empty, busy or not removable (what is
    left shows in ``leftovers``)."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def _rmdir_tree(path: Path) -> None:
    """rmdir the directories under ``path``, bottom-up, then ``path``: a directory that holds a
    file stays (a cgroup directory holds only virtual files, which rmdir takes with it)."""
    if not path.is_dir() or path.is_symlink():
        return
    for dirpath, dirnames, _files in os.walk(path, topdown=False):
        for d in dirnames:
            _rmdir(Path(dirpath) / d)
    _rmdir(path)
