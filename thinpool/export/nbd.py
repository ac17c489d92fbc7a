"""An NBD server over a :class:`~thinpool.pool.Pool`: every volume an export, by its name.

Contract:

* **Protocol.** Fixed newstyle handshake; options GO, INFO, EXPORT_NAME, LIST, ABORT,
  STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (``base:allocation``, from the thin
  mapping: unprovisioned ranges HOLE|ZERO, provisioned ranges 0); STARTTLS, EXTENDED_HEADERS and
  unknown options get ERR_UNSUP and the handshake goes on. Commands READ, WRITE, FLUSH, TRIM,
  WRITE_ZEROES, CACHE, BLOCK_STATUS and DISC, with simple replies (what the kernel's client
  uses) or structured ones once negotiated. Block sizes advertised: minimum 1 (volumes take any
  byte range), preferred the pool's block size, maximum payload :data:`MAX_PAYLOAD`.
* **Exports.** Every volume of the pool (or only those named in ``exports``), each read-only when
  the server is (``read_only=True``) or the volume is marked read-only. All connections to one
  volume share one :class:`~thinpool.volume.Volume`, so CAN_MULTI_CONN is advertised: a FLUSH on
  any connection makes every write acknowledged on any connection durable.
* **Durability.** An acknowledged FLUSH, and any request with FUA, has been committed (data
  fsync, then the metadata, superblock last) before its reply is sent. Besides, the pool is
  committed every ``commit_interval`` seconds while writes came in (skipped, not waited for, while
  a reader holds the last commit), when a connection closes and when the server stops.
* **Errors.** As the protocol says: EINVAL for a read, trim, cache or block-status request past
  the end, for an unknown command or flag and for BLOCK_STATUS without a negotiated context;
  ENOSPC for a write past the end and when the pool has no data space left (after the pool's own
  wait, if its ``wait_for_space`` and options allow one); EPERM for a change to a read-only
  export; ENOTSUP for WRITE_ZEROES with both FAST_ZERO and NO_HOLE; EIO for anything else the
  library raised (the pool degraded, a device I/O error), logged. A malformed or hostile peer
  (bad magic, truncated request, unknown client flags, option data above :data:`MAX_OPTION`, a
  write above :data:`MAX_PAYLOAD`, a peer that vanishes mid-request) loses its connection only:
  the server, the pool and every other connection go on. A write whose payload never fully
  arrived writes nothing.
* **Threads.** One thread accepts on every listening socket; each connection is served by a
  thread of its own (:mod:`.nbd_conn`), handling its requests in order (replies never
  interleave); a timer thread commits. Pool I/O blocks (pread/pwrite/fsync, a wait for space) and the pool serialises
  metadata changes under its own mutex, so a thread per connection runs it directly; an asyncio
  loop would have to hand every request to a thread pool (a cross-thread hand-off each) or stall
  every connection during an fsync or a wait for space. Measured against an asyncio probe
  (bench/nbd_asyncio.py, workload 13 in bench/README.md): inline in the loop it tied the threads
  where syncs are free and lost up to 1.5x on disk (it stops both of nbdcopy's connections at
  every fsync), with a thread pool it lost 1.3-1.9x; bench/test_nbd.py has the figures against
  qemu-nbd.
* **Stopping.** :meth:`NBDServer.close` stops accepting, lets each connection finish the request
  it is in, closes them, joins the threads and commits. It leaves the pool open: its owner closes
  it. An exception from the final commit goes up after every thread has stopped.

Nothing here prints; events go to the ``thinpool.export.nbd`` logger.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING

from thinpool.errors import InvalidArgument, NotFound, ThinpoolError

from .state import check_socket_path
from .nbd_conn import MAX_OPTION, MAX_PAYLOAD, Connection, Export, Hangup  # noqa: F401 (API)

if TYPE_CHECKING:
    from thinpool.pool import Pool
    from thinpool.volume import Volume

log = logging.getLogger("thinpool.export.nbd")

class NBDServer:
    """Serves a pool's volumes over NBD (see the module docstring). Use :meth:`listen_unix` and
    :meth:`listen_tcp`, then :meth:`start`; :meth:`close` (or leaving a ``with`` block) stops."""

    def __init__(self, pool: "Pool", *, read_only: bool = False, exports=None,
                 commit_interval: float | None = 1.0):
        if commit_interval is not None and not commit_interval > 0:
            raise InvalidArgument(f"commit interval {commit_interval!r}: give a number of "
                                  f"seconds above 0")
        self.pool = pool
        self.read_only = read_only or pool.read_only
        self.commit_interval = commit_interval
        self._only = None if exports is None else list(exports)
        if self._only is not None:
            missing = [n for n in self._only if n not in pool.volumes()]
            if missing:
                raise NotFound(f"no volume {missing[0]!r} in pool {pool.name} to export")
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._volumes: dict[str, "Volume"] = {}    # one shared handle per volume
        self._conns: dict[int, socket.socket] = {}
        self._sessions: dict[int, Connection] = {}   # the same connections, as served
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._dirty = False
        self._started = False
        self._closed = False
        self.connections_served = 0

    # -- setting up ----------------------------------------------------------------------------
    def listen_unix(self, path) -> str:
        """Listen on a Unix socket at ``path`` (which must not exist); returns the path."""
        text = check_socket_path(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(text)
            s.listen(64)
        except OSError as e:
            s.close()
            raise InvalidArgument(f"cannot listen on {text}: {e.strerror or e}") from None
        self._listeners.append(s)
        self._unix_paths.append(text)
        return text

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP ``host:port`` (port 0: any free one); returns the address bound."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror}") from None
        family, _, _, _, addr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(64)
        except OSError as e:
            s.close()
            raise InvalidArgument(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._listeners.append(s)
        bound = s.getsockname()
        return bound[0], bound[1]

    def start(self) -> None:
        """Start accepting (and the commit timer). Returns at once."""
        if self._started:
            return
        if not self._listeners:
            raise InvalidArgument("the NBD server has no socket to listen on")
        self._started = True
        self._spawn(self._accept_loop, "nbd-accept")
        if self.commit_interval is not None and not self.pool.read_only:
            self._spawn(self._commit_loop, "nbd-commit")

    def __enter__(self) -> "NBDServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def export_names(self) -> list[str]:
        names = self.pool.volumes()
        if self._only is not None:
            names = [n for n in names if n in self._only]
        return names

    def users(self, name: str) -> int:
        """How many connections are in transmission on export ``name`` now."""
        with self._lock:
            return sum(1 for c in self._sessions.values() if c.export_name == name)

    def is_read_only(self, name: str) -> bool:
        return self.read_only or self.pool.volume(name).read_only

    # -- stopping ------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Stop (see the module docstring). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:               # each thread finishes its request, then reads EOF
            try:
                c.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:               # a thread still stuck (in a wait for space): cut it off
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in self._listeners:
            s.close()
        for p in self._unix_paths:
            try:
                os.unlink(p)
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if not self.pool.read_only:
            self._commit(wait=True)

    # -- threads -------------------------------------------------------------------------------
    def _spawn(self, target, name: str, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for s in self._listeners:
                sel.register(s, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self._stop.is_set():
                        return
                    try:
                        conn, _ = key.fileobj.accept()
                    except OSError as e:
                        if e.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS,
                                       _errno.ENOMEM):
                            log.warning("accept failed: %s", e)
                            time.sleep(0.1)
                        continue
                    self._spawn(self._serve, "nbd-conn", conn)
        finally:
            sel.close()

    def _commit_loop(self) -> None:
        while not self._stop.wait(self.commit_interval):
            if self._dirty:
                self._commit(wait=False)

    def _commit(self, wait: bool) -> None:
        """Commit what was written; a failure is logged (the next FLUSH reports it)."""
        self._dirty = False
        try:
            if not self.pool.commit(wait=wait):
                self._dirty = True        # a reader held the last commit: next time
        except ThinpoolError as e:
            log.error("commit of pool %s failed: %s", self.pool.name, e)
        except Exception:  # noqa: BLE001 - a bug must not kill the timer
            log.exception("commit of pool %s failed", self.pool.name)

    # -- one connection --------------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        key = id(sock)
        with self._lock:
            if self._stop.is_set():
                sock.close()
                return
            self._conns[key] = sock
            self.connections_served += 1
        conn = Connection(self, sock)
        with self._lock:
            self._sessions[key] = conn
        try:
            conn.run()
        except Hangup as e:
            if str(e):
                log.info("connection closed: %s", e)
        except OSError as e:
            log.info("connection lost: %s", e)
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the server
            log.exception("connection failed")
        finally:
            with self._lock:
                self._conns.pop(key, None)
                self._sessions.pop(key, None)
            try:
                sock.close()
            except OSError:
                pass
            if conn.wrote and not self.pool.read_only and not self._closed:
                self._commit(wait=True)

    # -- what a connection asks (nbd_conn.Host) ---------------------------------------------------
    def stopping(self) -> bool:
        return self._stop.is_set()

    def note_write(self) -> None:
        self._dirty = True

    def find_export(self, name: str) -> Export | None:
        """The export called ``name`` (the one volume for an empty name), or None."""
        names = self.export_names()
        if name == "" and len(names) == 1:
            name = names[0]
        if name not in names:
            return None
        with self._lock:
            vol = self.pool.volume(name)
            self._volumes[name] = vol       # every connection shares this handle
        return Export(name, vol, vol.size, self.read_only or vol.read_only)
