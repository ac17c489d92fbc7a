"""``thinpool serve``'s process: one pool held open for writing and served over NBD.

A :class:`Daemon` is given a pool its caller opened for writing (so the pool's writer lock is held
for the daemon's whole life: other writers get BusyError naming this process) and its directory.
:meth:`Daemon.start` then

* listens for NBD clients on a Unix socket (``POOL_DIR/nbd.sock`` unless another path is given)
  and, if asked, on TCP (:class:`~thinpool.export.nbd.NBDServer`; every volume is an export);
* listens on a control socket, ``POOL_DIR/control.sock``: one JSON request per line, one JSON
  answer per line (``status``, ``stop``, ``attach``, ``detach``, ``run``: see
  :meth:`Daemon.control`);
  errors are ``{"ok": false, "error": MESSAGE, "exit_code": N}``;
* writes ``POOL_DIR/serve.pid`` and the state file ``POOL_DIR/exports.json`` (atomically: temp
  file, fsync, rename), which says what is served: pid, socket, TCP address, and per volume
  ``{"name", "read_only", "nbd": true, "attached": LOOP_DEVICE or null}``;
* logs to ``POOL_DIR/serve.log`` (the ``thinpool`` logger).

:meth:`Daemon.wait` returns once a stop is asked for (:meth:`request_stop`, from a signal handler
or the control socket); :meth:`Daemon.stop` then detaches every attached volume (last attached
first), stops the NBD server (which commits), commits, and removes the pid file, the state file
and the sockets. The pool stays open: the caller closes it.

Files a dead daemon left (a pid file, a state file, sockets) are stale, and so are the FUSE
mounts and loop devices of its attachments under ``POOL_DIR/run`` (:meth:`start` sweeps them
away first: :func:`~thinpool.export.loop.sweep_run_dir`): :func:`read_state` ignores them (the state counts only while its pid holds the pool's writer lock) and a new daemon
replaces them. A path that is something other than a socket is never removed.

If :meth:`start` fails midway, what it had made (sockets, files, threads) is undone before the
error goes up. ``attach``/``detach`` use :mod:`thinpool.export.fuse` (imported when first asked
for); without it, or without mfusepy, they answer an error saying what is missing. Nothing here
prints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from thinpool import records
from thinpool.errors import BusyError, InvalidArgument, NotFound, ThinpoolError
from thinpool.locking import process_command

from .nbd import NBDServer
from .state import (CONTROL_NAME, LOG_NAME, MAX_REQUEST, PID_NAME, RUN_NAME,  # noqa: F401
                    SOCKET_NAME, STATE_NAME, ask, check_socket_path, clear_stale_socket, nbd_uri,
                    pid_alive, read_state)

if TYPE_CHECKING:
    from thinpool.pool import Pool

log = logging.getLogger("thinpool.export.daemon")


@dataclass
class ServeOptions:
    socket: Path | None = None               # None: POOL_DIR/nbd.sock
    tcp: tuple[str, int] | None = None       # (host, port) to listen on too
    read_only: bool = False
    exports: list[str] | None = None         # None: every volume
    commit_interval: float = 1.0
    #: Started by ``thinpool attach``: stop once the last attached volume is detached.
    stop_when_detached: bool = False


# -- the daemon ----------------------------------------------------------------------------------
class Daemon:
    def __init__(self, pool: "Pool", pool_dir, options: ServeOptions | None = None,
                 run_command=None):
        self.pool = pool
        #: ``run_command(request, daemon) -> answer``: runs ``{"op": "run"}`` requests (the
        #: command line gives one: commands other processes send to the pool it holds).
        self.run_command = run_command
        self.dir = Path(pool_dir)
        self.options = options or ServeOptions()
        self.socket_path = str(self.options.socket or self.dir / SOCKET_NAME)
        self.control_path = str(self.dir / CONTROL_NAME)
        self.tcp: str | None = None
        self.server: NBDServer | None = None
        self.attachments: dict[str, object] = {}      # volume -> fuse.Attachment, in order
        self._stop = threading.Event()
        self._control: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._mutex = threading.RLock()   # control requests one at a time
        # Changes of the attachments. Taken after _mutex (a control request) or after the
        # runtime snapshotter's lock (attach_volume/detach_volume from its gRPC calls), never
        # before either: a forwarded command holds _mutex and may wait for the snapshotter's
        # lock while a gRPC call holding that lock attaches.
        self._attach_lock = threading.RLock()
        self._made: list[str] = []                     # files to remove at stop
        self._log_handler: logging.Handler | None = None
        self.started = 0.0

    # -- starting ----------------------------------------------------------------------------
    def start(self) -> None:
        opts = self.options
        self._start_log()
        try:
            self.pool.wait_for_space = True     # clients may free space: queue, as dm-thin does
            from . import loop
            for line in loop.sweep_run_dir(self.dir / RUN_NAME):    # a killed server's leftovers
                log.warning("run directory: %s", line)
            self.server = NBDServer(self.pool, read_only=opts.read_only, exports=opts.exports,
                                    commit_interval=opts.commit_interval)
            for path in (self.socket_path, self.control_path):
                clear_stale_socket(path)
            self.server.listen_unix(self.socket_path)
            self._made.append(self.socket_path)
            if opts.tcp is not None:
                host, port = self.server.listen_tcp(*opts.tcp)
                self.tcp = f"{host}:{port}"
            self._listen_control()
            self.started = time.time()
            self._write_file(PID_NAME, f"{os.getpid()}\n")
            self.write_state()
            self.server.start()
            t = threading.Thread(target=self._control_loop, name="serve-control", daemon=True)
            t.start()
            self._threads.append(t)
        except BaseException:
            self._teardown()
            raise
        log.info("serving pool %s (pid %d) on %s%s", self.pool.name, os.getpid(),
                 self.socket_path, f" and tcp {self.tcp}" if self.tcp else "")

    def _start_log(self) -> None:
        try:
            h = logging.FileHandler(self.dir / LOG_NAME)
        except OSError as e:
            raise InvalidArgument(f"cannot write {self.dir / LOG_NAME}: {e.strerror}") from None
        h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                         "%(message)s"))
        root = logging.getLogger("thinpool")
        root.addHandler(h)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._log_handler = h

    def _listen_control(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(check_socket_path(self.control_path))
            os.chmod(self.control_path, 0o600)
            s.listen(8)
        except OSError as e:
            s.close()
            raise InvalidArgument(f"cannot listen on {self.control_path}: "
                                  f"{e.strerror or e}") from None
        self._control = s
        self._made.append(self.control_path)

    def _write_file(self, name: str, text: str) -> None:
        records.replace_file(self.dir / name, text)
        if str(self.dir / name) not in self._made:
            self._made.append(str(self.dir / name))

    # -- what is served ---------------------------------------------------------------------------
    def uris(self) -> list[str]:
        out = []
        for name in self.server.export_names():
            out.append(nbd_uri(name, self.socket_path))
            if self.tcp:
                out.append(nbd_uri(name, tcp=self.tcp))
        return out

    def state(self) -> dict:
        srv = self.server
        return {
            "pid": os.getpid(), "pool": self.pool.name,
            "command": process_command(os.getpid()).strip(" ()"),
            "socket": self.socket_path, "tcp": self.tcp, "control": self.control_path,
            "read_only": srv.read_only, "commit_interval": self.options.commit_interval,
            "started": self.started, "uris": self.uris(),
            "stopping": self._stop.is_set(),
            "volumes": [{"name": n, "read_only": srv.is_read_only(n), "nbd": True,
                         "attached": getattr(self.attachments.get(n), "loop_device", None)}
                        for n in srv.export_names()],
        }

    def write_state(self) -> None:
        self._write_file(STATE_NAME, json.dumps(self.state(), indent=1) + "\n")

    # -- running and stopping -----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (safe from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Detach everything (last attached first), stop serving, commit, remove the files."""
        with self._mutex:
            for name in reversed(list(self.attachments)):
                try:
                    self._detach(name)
                except ThinpoolError as e:
                    log.error("could not detach %s: %s", name, e)
        self._teardown()
        self.pool.commit()
        log.info("stopped serving pool %s", self.pool.name)

    def _teardown(self) -> None:
        self._stop.set()
        if self._control is not None:
            try:
                self._control.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._control.close()
            self._control = None
        try:
            if self.server is not None:
                self.server.close()
        finally:
            for t in self._threads:
                t.join(5)
            for path in reversed(self._made):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self._made = []
            if self._log_handler is not None:
                logging.getLogger("thinpool").removeHandler(self._log_handler)
                self._log_handler.close()
                self._log_handler = None

    # -- the control socket ---------------------------------------------------------------------------
    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._control.accept()
            except (OSError, AttributeError):
                return
            t = threading.Thread(target=self._control_conn, args=(conn,), name="serve-ctl",
                                 daemon=True)
            t.start()

    def _control_conn(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rwb") as f:
                while True:
                    line = f.readline(MAX_REQUEST + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST:
                        answer = _error(InvalidArgument("control request too long"))
                        f.write(json.dumps(answer).encode() + b"\n")
                        f.flush()
                        return
                    try:
                        request = json.loads(line)
                        if not isinstance(request, dict):
                            raise ValueError("not an object")
                    except ValueError as e:
                        answer = _error(InvalidArgument(f"control request is not a JSON "
                                                        f"object: {e}"))
                    else:
                        answer = self.control(request)
                    f.write(json.dumps(answer).encode() + b"\n")
                    f.flush()
                    if request.get("op") == "stop" and answer.get("ok"):
                        self.request_stop()
                        return
        except OSError:
            pass

    def control(self, request: dict) -> dict:
        """Answer one control request: ``{"op": "status"}`` (the state), ``{"op": "stop"}``,
        ``{"op": "attach", "volume": NAME, "read_only": bool}`` (``loop_device`` in the
        answer), ``{"op": "detach", "volume": NAME}``, ``{"op": "run", ...}`` (a command another
        process sends to the pool held here: :attr:`run_command`)."""
        op = request.get("op")
        try:
            with self._mutex:
                if op == "status":
                    return {"ok": True, **self.state()}
                if op == "stop":
                    for name in reversed(list(self.attachments)):
                        self._detach(name)
                    return {"ok": True, "pid": os.getpid()}
                if op == "attach":
                    return {"ok": True, "loop_device": self._attach(
                        request.get("volume"), bool(request.get("read_only", False)))}
                if op == "run":
                    if self.run_command is None:
                        raise InvalidArgument("this thinpool serve runs no commands for others")
                    try:
                        return self.run_command(request, self)
                    finally:
                        self.write_state()        # volumes may have come or gone
                        if self.options.stop_when_detached and not self.attachments:
                            self.request_stop()   # started for that command, which left nothing
                if op == "detach":
                    name = request.get("volume")
                    if name not in self.attachments:
                        raise NotFound(f"volume {self.pool.name}/{name} is not attached")
                    self._detach(name)
                    stopping = self.options.stop_when_detached and not self.attachments
                    if stopping:
                        self.request_stop()
                    return {"ok": True, "stopping": stopping}
                raise InvalidArgument(f"unknown control request {op!r} (status, stop, attach, "
                                      f"detach, run)")
        except ThinpoolError as e:
            return _error(e)
        except Exception as e:  # noqa: BLE001 - the daemon answers, whatever happened
            log.exception("control request %r failed", request)
            return {"ok": False, "error": f"unexpected error: {type(e).__name__}: {e}",
                    "exit_code": 1}

    def in_use(self, name: str) -> str | None:
        """How volume ``name`` is in use here (attached, open on NBD connections), or None."""
        uses = []
        att = self.attachments.get(name)
        if att is not None:
            uses.append(f"attached as {att.loop_device}")
        n = self.server.users(name) if self.server is not None else 0
        if n:
            uses.append(f"open on {n} NBD connection{'' if n == 1 else 's'}")
        if not uses:
            return None
        return " and ".join(uses) + f" (thinpool serve, process {os.getpid()})"

    def attach_volume(self, name: str, read_only: bool = False) -> str:
        """Attach volume ``name`` (as the ``attach`` request does, for code of this process:
        the runtime's snapshotter); its loop device."""
        return self._attach(name, read_only)

    def detach_volume(self, name: str) -> None:
        """Detach volume ``name`` if it is attached (BusyError while its device is in use).
        Unlike the ``detach`` request, never stops the daemon."""
        with self._attach_lock:
            if name in self.attachments:
                self._detach(name)

    def attached_device(self, name: str) -> str | None:
        att = self.attachments.get(name)
        return None if att is None else att.loop_device

    def _attach(self, name, read_only: bool) -> str:
        with self._attach_lock:
            return self._attach_locked(name, read_only)

    def _attach_locked(self, name, read_only: bool) -> str:
        if not isinstance(name, str) or name not in self.server.export_names():
            raise NotFound(f"no volume {name!r} served from pool {self.pool.name}")
        if name in self.attachments:
            raise BusyError(f"volume {self.pool.name}/{name} is attached already at "
                            f"{self.attachments[name].loop_device}")
        fuse = _fuse_module()
        run_dir = self.dir / RUN_NAME
        run_dir.mkdir(exist_ok=True)
        try:
            att = fuse.attach(self.pool, name, read_only=read_only or self.server.is_read_only(name),
                              run_dir=run_dir)
        except ImportError as e:          # mfusepy (or libfuse) missing, found only now
            raise ThinpoolError(f"attaching {self.pool.name}/{name} needs mfusepy and libfuse3 "
                                f"(pip install 'thinpool[fuse]'): {e}") from None
        self.attachments[name] = att
        self.write_state()
        log.info("attached %s at %s", name, att.loop_device)
        return att.loop_device

    def _detach(self, name: str) -> None:
        with self._attach_lock:
            self._detach_locked(name)

    def _detach_locked(self, name: str) -> None:
        att = self.attachments[name]
        att.close()
        del self.attachments[name]
        self.write_state()
        log.info("detached %s from %s", name, att.loop_device)


def _fuse_module():
    try:
        from . import fuse
    except ImportError as e:
        raise ThinpoolError(f"attaching a volume needs the FUSE export (thinpool.export.fuse "
                            f"and mfusepy: pip install 'thinpool[fuse]'), which is not available: "
                            f"{e}") from None
    return fuse


def _error(e: ThinpoolError) -> dict:
    return {"ok": False, "error": str(e), "exit_code": e.exit_code}
