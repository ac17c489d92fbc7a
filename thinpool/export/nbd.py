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
  thread of its own, handling its requests in order (replies never interleave); a timer thread
  commits. Pool I/O blocks (pread/pwrite/fsync, a wait for space) and the pool serialises
  metadata changes under its own mutex; in CPython threads measured faster than an asyncio loop
  handing each request to a thread pool (see bench/test_nbd.py's docstring).
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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinpool.errors import (InvalidArgument, NoSpace, NotFound, OutOfRange, ThinpoolError,
                             VolumeReadOnly)

from . import nbd_wire as w

if TYPE_CHECKING:
    from thinpool.pool import Pool
    from thinpool.volume import Volume

log = logging.getLogger("thinpool.export.nbd")

MAX_PAYLOAD = 32 << 20          # largest READ/WRITE we take (the protocol's usual maximum)
MAX_OPTION = 64 << 10           # option data above this closes the connection
MAX_STATUS_BLOCKS = 1 << 16     # BLOCK_STATUS looks at most this many blocks per request
ZERO_CHUNK = 4 << 20            # WRITE_ZEROES with NO_HOLE writes zeros this much at a time
_ZEROS = bytes(ZERO_CHUNK)
_META_CONTEXT_ID = 1            # the id of base:allocation on every connection
SOCKET_PATH_MAX = 107           # sun_path holds 108 bytes with the terminating NUL

_SERVER_FLAGS = w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES
_ALLOWED_FLAGS = {
    w.CMD_READ: w.CMD_FLAG_FUA | w.CMD_FLAG_DF,
    w.CMD_WRITE: w.CMD_FLAG_FUA,
    w.CMD_DISC: w.CMD_FLAG_FUA,
    w.CMD_FLUSH: w.CMD_FLAG_FUA,
    w.CMD_TRIM: w.CMD_FLAG_FUA,
    w.CMD_CACHE: w.CMD_FLAG_FUA,
    w.CMD_WRITE_ZEROES: w.CMD_FLAG_FUA | w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FAST_ZERO,
    w.CMD_BLOCK_STATUS: w.CMD_FLAG_FUA | w.CMD_FLAG_REQ_ONE,
}
_CHANGES = (w.CMD_WRITE, w.CMD_TRIM, w.CMD_WRITE_ZEROES)


class _Hangup(Exception):
    """The connection ends: the peer went away, broke the protocol, or asked to."""


class _RequestError(Exception):
    """A request fails with an NBD error number (the connection goes on)."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


@dataclass
class _Export:
    name: str
    volume: "Volume"
    size: int
    read_only: bool

    @property
    def flags(self) -> int:
        f = (w.TF_HAS_FLAGS | w.TF_SEND_FLUSH | w.TF_SEND_FUA | w.TF_CAN_MULTI_CONN
             | w.TF_SEND_CACHE)
        if self.read_only:
            return f | w.TF_READ_ONLY
        return f | w.TF_SEND_TRIM | w.TF_SEND_WRITE_ZEROES | w.TF_SEND_FAST_ZERO


def check_socket_path(path) -> str:
    """``path`` as text if a Unix socket can be bound there; InvalidArgument if it is too long."""
    text = os.fspath(path)
    if len(os.fsencode(text)) > SOCKET_PATH_MAX:
        raise InvalidArgument(f"socket path {text} is {len(os.fsencode(text))} bytes long, more "
                              f"than a Unix socket address holds ({SOCKET_PATH_MAX}): give a "
                              f"shorter one")
    return text


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
        conn = _Connection(self, sock)
        try:
            conn.run()
        except _Hangup as e:
            if str(e):
                log.info("connection closed: %s", e)
        except OSError as e:
            log.info("connection lost: %s", e)
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the server
            log.exception("connection failed")
        finally:
            with self._lock:
                self._conns.pop(key, None)
            try:
                sock.close()
            except OSError:
                pass
            if conn.wrote and not self.pool.read_only and not self._closed:
                self._commit(wait=True)

    def _export(self, name: str) -> _Export | None:
        """The export called ``name`` (the one volume for an empty name), or None."""
        names = self.export_names()
        if name == "" and len(names) == 1:
            name = names[0]
        if name not in names:
            return None
        with self._lock:
            vol = self.pool.volume(name)
            self._volumes[name] = vol       # every connection shares this handle
        return _Export(name, vol, vol.size, self.read_only or vol.read_only)


class _Connection:
    """The handshake and transmission phase of one client (one thread)."""

    def __init__(self, server: NBDServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=256 << 10)
        self.no_zeroes = False
        self.structured = False
        self.context: bytes | None = None       # the export name base:allocation was set for
        self.wrote = False
        self.view = memoryview(bytearray(0))    # the payload buffer, grown as needed

    # -- bytes in and out ------------------------------------------------------------------------
    def recv(self, n: int, what: str) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise _Hangup(f"the client went away in the middle of {what}" if data or n == 0
                          else "")
        return data

    def _buffer(self, length: int) -> memoryview:
        """The connection's reused payload buffer, ``length`` bytes of it (grown as needed)."""
        if len(self.view) < length:
            self.view = memoryview(bytearray(1 << (length - 1).bit_length()))
        return self.view[:length]

    def send(self, *parts) -> None:
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts)
        if sent < total:                 # rare: a signal or a full buffer cut it short
            rest = b"".join(bytes(p) for p in parts)[sent:]
            self.sock.sendall(rest)

    # -- handshake -------------------------------------------------------------------------------
    def run(self) -> None:
        self.send(w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, _SERVER_FLAGS))
        (cflags,) = w.CLIENT_FLAGS.unpack(self.recv(4, "the client flags"))
        if cflags & ~w.CLIENT_KNOWN or not cflags & w.CLIENT_FIXED_NEWSTYLE:
            raise _Hangup(f"client flags {cflags:#x} not supported")
        self.no_zeroes = bool(cflags & w.CLIENT_NO_ZEROES)
        export = self.options()
        if export is not None:
            self.transmission(export)

    def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, opt, rtype, len(data)), data)

    def options(self) -> _Export | None:
        while True:
            magic, opt, length = w.OPTION.unpack(self.recv(w.OPTION.size, "an option"))
            if magic != w.IHAVEOPT:
                raise _Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                self.reply(opt, w.REP_ERR_TOO_BIG, b"option data too long")
                raise _Hangup(f"option {opt} with {length} bytes of data")
            data = self.recv(length, "option data")
            if self.server._stop.is_set():
                self.reply(opt, w.REP_ERR_SHUTDOWN, b"the server is shutting down")
                raise _Hangup("")
            if opt == w.OPT_EXPORT_NAME:
                export = self.server._export(data.decode("utf-8", "replace"))
                if export is None:       # this option cannot fail: hang up
                    raise _Hangup(f"no export {data!r}")
                pad = b"" if self.no_zeroes else bytes(w.EXPORT_NAME_PAD)
                self.send(w.EXPORT_NAME_REPLY.pack(export.size, self._tflags(export)), pad)
                return export
            if opt == w.OPT_ABORT:
                self.reply(opt, w.REP_ACK)
                raise _Hangup("")
            handler = {w.OPT_LIST: self.opt_list, w.OPT_INFO: self.opt_info,
                       w.OPT_GO: self.opt_info, w.OPT_STRUCTURED_REPLY: self.opt_structured,
                       w.OPT_LIST_META_CONTEXT: self.opt_meta,
                       w.OPT_SET_META_CONTEXT: self.opt_meta}.get(opt)
            if handler is None:          # STARTTLS, EXTENDED_HEADERS, anything unknown
                self.reply(opt, w.REP_ERR_UNSUP, f"option {opt} is not supported".encode())
                continue
            export = handler(opt, data)
            if export is not None:
                return export

    def _tflags(self, export: _Export) -> int:
        return export.flags | (w.TF_SEND_DF if self.structured else 0)

    def opt_list(self, opt: int, data: bytes) -> None:
        if data:
            self.reply(opt, w.REP_ERR_INVALID, b"LIST takes no data")
            return
        for name in self.server.export_names():
            raw = name.encode()
            self.reply(opt, w.REP_SERVER, w.U32.pack(len(raw)) + raw)
        self.reply(opt, w.REP_ACK)

    def opt_structured(self, opt: int, data: bytes) -> None:
        if data:
            self.reply(opt, w.REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
        elif self.structured:
            self.reply(opt, w.REP_ERR_INVALID, b"structured replies are on already")
        else:
            self.structured = True
            self.reply(opt, w.REP_ACK)

    @staticmethod
    def _name_at(data: bytes, pos: int = 0) -> tuple[bytes, int] | None:
        """A u32-length-prefixed string at ``pos``: (bytes, next position), None if short."""
        if len(data) < pos + 4:
            return None
        (n,) = w.U32.unpack_from(data, pos)
        if len(data) < pos + 4 + n:
            return None
        return data[pos + 4: pos + 4 + n], pos + 4 + n

    def opt_info(self, opt: int, data: bytes) -> _Export | None:
        got = self._name_at(data)
        if got is None or len(data) < got[1] + 2:
            self.reply(opt, w.REP_ERR_INVALID, b"malformed INFO/GO request")
            return None
        raw, pos = got
        (n,) = w.U16.unpack_from(data, pos)
        if len(data) != pos + 2 + 2 * n:
            self.reply(opt, w.REP_ERR_INVALID, b"malformed INFO/GO request")
            return None
        wanted = {w.U16.unpack_from(data, pos + 2 + 2 * i)[0] for i in range(n)}
        name = raw.decode("utf-8", "replace")
        export = self.server._export(name)
        if export is None:
            self.reply(opt, w.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        self.reply(opt, w.REP_INFO, w.INFO_EXPORT_PAYLOAD.pack(w.INFO_EXPORT, export.size,
                                                               self._tflags(export)))
        if w.INFO_NAME in wanted:
            self.reply(opt, w.REP_INFO, w.U16.pack(w.INFO_NAME) + export.name.encode())
        if w.INFO_DESCRIPTION in wanted:
            desc = f"thin volume {self.server.pool.name}/{export.name}".encode()
            self.reply(opt, w.REP_INFO, w.U16.pack(w.INFO_DESCRIPTION) + desc)
        bs = self.server.pool.block_size
        preferred = bs if bs & (bs - 1) == 0 and bs <= MAX_PAYLOAD else 4096
        self.reply(opt, w.REP_INFO, w.INFO_BLOCK_SIZE_PAYLOAD.pack(
            w.INFO_BLOCK_SIZE, 1, preferred, MAX_PAYLOAD))
        self.reply(opt, w.REP_ACK)
        if opt != w.OPT_GO:
            return None
        if self.context is not None and self.context != raw and not (
                raw == b"" and self.context == export.name.encode()):
            self.context = None          # contexts were chosen for another export
        return export

    def opt_meta(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self.reply(opt, w.REP_ERR_INVALID, b"negotiate structured replies first")
            return
        got = self._name_at(data)
        if got is None or len(data) < got[1] + 4:
            self.reply(opt, w.REP_ERR_INVALID, b"malformed meta context request")
            return
        raw, pos = got
        (nq,) = w.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(nq):
            q = self._name_at(data, pos)
            if q is None:
                self.reply(opt, w.REP_ERR_INVALID, b"malformed meta context request")
                return
            queries.append(q[0])
            pos = q[1]
        if pos != len(data):
            self.reply(opt, w.REP_ERR_INVALID, b"malformed meta context request")
            return
        export = self.server._export(raw.decode("utf-8", "replace"))
        if export is None:
            self.reply(opt, w.REP_ERR_UNKNOWN, f"no export named {raw!r}".encode())
            return
        listing = opt == w.OPT_LIST_META_CONTEXT
        if listing:
            match = not queries or any(q in (b"base:", w.BASE_ALLOCATION) for q in queries)
        else:
            match = w.BASE_ALLOCATION in queries
            self.context = raw if match else None
        if match:
            cid = 0 if listing else _META_CONTEXT_ID
            self.reply(opt, w.REP_META_CONTEXT, w.META_CONTEXT_ID.pack(cid) + w.BASE_ALLOCATION)
        self.reply(opt, w.REP_ACK)

    # -- transmission ----------------------------------------------------------------------------
    def transmission(self, export: _Export) -> None:
        vol = export.volume
        structured = self.structured
        has_context = self.context is not None
        server = self.server
        while True:
            head = self.rfile.read(w.REQUEST.size)
            if len(head) != w.REQUEST.size:
                raise _Hangup("a truncated request" if head else "")
            magic, flags, cmd, cookie, offset, length = w.REQUEST.unpack(head)
            if magic != w.REQUEST_MAGIC:
                raise _Hangup(f"bad request magic {magic:#x}")
            payload = None
            if cmd == w.CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise _Hangup(f"a write of {length} bytes (the most is {MAX_PAYLOAD})")
                if length <= 65536:
                    payload = self.recv(length, "a write's payload")   # bytes: the fast path
                else:
                    payload = self._buffer(length)
                    if self.rfile.readinto(payload) != length:
                        raise _Hangup("the client went away in the middle of a write's payload")
            if cmd == w.CMD_DISC:
                return
            try:
                self._check(export, cmd, flags, offset, length, structured, has_context)
                if cmd == w.CMD_READ:
                    if length <= 65536:          # bytes: the lock-free path of small reads
                        data = vol.read(offset, length) if length else b""
                    else:
                        data = self._buffer(length)
                        vol.read_into(offset, data)
                    if flags & w.CMD_FLAG_FUA:
                        vol.flush()
                    self._read_reply(cookie, offset, data, structured)
                    continue
                if cmd == w.CMD_BLOCK_STATUS:
                    self._status_reply(cookie, export, offset, length,
                                       bool(flags & w.CMD_FLAG_REQ_ONE))
                    continue
                if cmd == w.CMD_WRITE:
                    self.wrote = server._dirty = True
                    vol.write(offset, payload)
                elif cmd == w.CMD_TRIM:
                    self.wrote = server._dirty = True
                    vol.discard(offset, length)
                elif cmd == w.CMD_WRITE_ZEROES:
                    self.wrote = server._dirty = True
                    self._write_zeroes(vol, offset, length, flags)
                elif cmd == w.CMD_FLUSH:
                    vol.flush()
                # CACHE: nothing to do (the page cache has it or will)
                if flags & w.CMD_FLAG_FUA and cmd != w.CMD_FLUSH:
                    vol.flush()
            except _RequestError as e:
                self._error_reply(cookie, cmd, e.error, str(e), structured)
                continue
            except ThinpoolError as e:
                code = _error_number(e, cmd)
                if code == w.EIO:
                    log.error("%s of %d bytes at %d on %s failed: %s",
                              w.COMMAND_NAMES.get(cmd, cmd), length, offset, export.name, e)
                self._error_reply(cookie, cmd, code, str(e), structured)
                continue
            self.send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _check(self, export: _Export, cmd: int, flags: int, offset: int, length: int,
               structured: bool, has_context: bool) -> None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            raise _RequestError(w.EINVAL, f"unknown command {cmd}")
        if flags & w.CMD_FLAG_DF and not structured:
            allowed &= ~w.CMD_FLAG_DF
        if flags & ~allowed:
            raise _RequestError(w.EINVAL, f"flags {flags:#x} not valid for command "
                                          f"{w.COMMAND_NAMES[cmd]}")
        if cmd == w.CMD_FLUSH:
            return
        if offset + length > export.size:
            code = w.ENOSPC if cmd in (w.CMD_WRITE, w.CMD_WRITE_ZEROES) else w.EINVAL
            raise _RequestError(code, f"{length} bytes at offset {offset} reach past the end "
                                      f"of the export ({export.size} bytes)")
        if cmd == w.CMD_READ and length > MAX_PAYLOAD:
            raise _RequestError(w.EOVERFLOW if structured else w.EINVAL,
                                f"a read of {length} bytes (the most is {MAX_PAYLOAD})")
        if cmd in _CHANGES and export.read_only:
            raise _RequestError(w.EPERM, f"export {export.name} is read-only")
        if cmd == w.CMD_BLOCK_STATUS:
            if not structured or not has_context:
                raise _RequestError(w.EINVAL, "no metadata context was negotiated")
            if length == 0:
                raise _RequestError(w.EINVAL, "block status of 0 bytes")
        if (cmd == w.CMD_WRITE_ZEROES and flags & w.CMD_FLAG_FAST_ZERO
                and flags & w.CMD_FLAG_NO_HOLE):
            raise _RequestError(w.ENOTSUP, "zeroing without holes writes every byte: not fast")

    def _write_zeroes(self, vol, offset: int, length: int, flags: int) -> None:
        if not flags & w.CMD_FLAG_NO_HOLE:
            vol.discard(offset, length)         # unmaps whole blocks, zeroes the edges
            return
        end = offset + length
        while offset < end:                    # provisioned zeros: a real write
            n = min(ZERO_CHUNK, end - offset)
            vol.write(offset, _ZEROS if n == ZERO_CHUNK else _ZEROS[:n])
            offset += n

    # -- replies ---------------------------------------------------------------------------------
    def _read_reply(self, cookie: int, offset: int, data, structured: bool) -> None:
        if not structured:
            self.send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie), data)
        elif not data:
            self.send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                   w.REPLY_TYPE_NONE, cookie, 0))
        else:
            self.send(w.CHUNK_OFFSET.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                          w.REPLY_TYPE_OFFSET_DATA, cookie, 8 + len(data),
                                          offset), data)

    def _error_reply(self, cookie: int, cmd: int, error: int, message: str,
                     structured: bool) -> None:
        if structured and cmd in (w.CMD_READ, w.CMD_BLOCK_STATUS):
            msg = message.encode()[:4096]
            self.send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                                   w.REPLY_TYPE_ERROR, cookie, w.ERROR_PAYLOAD.size + len(msg)),
                      w.ERROR_PAYLOAD.pack(error, len(msg)), msg)
        else:
            self.send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie))

    def _status_reply(self, cookie: int, export: _Export, offset: int, length: int,
                      one: bool) -> None:
        bs = self.server.pool.block_size
        window = min(length, MAX_STATUS_BLOCKS * bs - offset % bs)
        end = offset + window
        extents = []                      # (length, flags)
        pos = offset
        hole = w.STATE_HOLE | w.STATE_ZERO
        for lo, hi in export.volume.mapped_ranges(offset, window):
            if lo > pos:
                extents.append((lo - pos, hole))
            extents.append((hi - lo, 0))
            pos = hi
            if one:
                break
        if pos < end and not (one and extents):
            extents.append((end - pos, hole))
        if one:
            extents = extents[:1]
        body = b"".join(w.BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents)
        self.send(w.CHUNK.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE,
                               w.REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body)),
                  w.U32.pack(_META_CONTEXT_ID), body)


def _error_number(e: ThinpoolError, cmd: int) -> int:
    """The NBD error for a library error raised by command ``cmd``."""
    if isinstance(e, VolumeReadOnly):
        return w.EPERM
    if isinstance(e, NoSpace):
        return w.ENOSPC
    if isinstance(e, OutOfRange):
        return w.ENOSPC if cmd in (w.CMD_WRITE, w.CMD_WRITE_ZEROES) else w.EINVAL
    if isinstance(e, InvalidArgument):
        return w.EINVAL
    return w.EIO
