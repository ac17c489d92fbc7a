"""One NBD client connection: the handshake, then the transmission phase (see nbd.py).

:class:`Connection` runs in its own thread and talks to one socket; it reaches the server only
through the small :class:`Host` interface (the pool, the export names, an export by name,
whether the server stops, and "something was written"). Requests are handled in the order they
arrive and each reply (header and payload) is sent whole before the next request is read, so
replies never interleave.

What a bad peer leaves behind: :class:`Hangup` ends the connection (the caller closes the
socket); a WRITE whose payload did not fully arrive wrote nothing; a request that fails gets
its error reply and the connection goes on. Library errors become NBD error numbers
(:func:`error_number`); nothing else is raised on purpose. Nothing here prints.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from thinpool.errors import InvalidArgument, NoSpace, OutOfRange, ThinpoolError, VolumeReadOnly

from . import nbd_wire as w

if TYPE_CHECKING:
    from thinpool.pool import Pool
    from thinpool.volume import Volume

log = logging.getLogger("thinpool.export.nbd")

MAX_PAYLOAD = 32 << 20          # largest READ/WRITE we take (the protocol's usual maximum)
MAX_OPTION = 64 << 10           # option data above this closes the connection
MAX_STATUS_BLOCKS = 1 << 16     # BLOCK_STATUS looks at most this many blocks per request
SMALL = 64 << 10                # requests up to this size move as bytes (the volume's fast paths)
ZERO_CHUNK = 4 << 20            # WRITE_ZEROES with NO_HOLE writes zeros this much at a time
_ZEROS = bytes(ZERO_CHUNK)
_META_CONTEXT_ID = 1            # the id of base:allocation on every connection

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


class Host(Protocol):
    """What a connection needs from its server."""

    pool: "Pool"

    def export_names(self) -> list[str]: ...
    def find_export(self, name: str) -> "Export | None": ...
    def stopping(self) -> bool: ...
    def note_write(self) -> None: ...


class Hangup(Exception):
    """The connection ends: the peer went away, broke the protocol, or asked to."""


class _RequestError(Exception):
    """A request fails with an NBD error number (the connection goes on)."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


@dataclass
class Export:
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


class Connection:
    """The handshake and transmission phase of one client (one thread)."""

    def __init__(self, server: Host, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=256 << 10)
        self.no_zeroes = False
        self.export_name: str | None = None      # once in transmission
        self.structured = False
        self.context: bytes | None = None       # the export name base:allocation was set for
        self.wrote = False
        self.view = memoryview(bytearray(0))    # the payload buffer, grown as needed

    # -- bytes in and out ------------------------------------------------------------------------
    def recv(self, n: int, what: str) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise Hangup(f"the client went away in the middle of {what}" if data or n == 0
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
            raise Hangup(f"client flags {cflags:#x} not supported")
        self.no_zeroes = bool(cflags & w.CLIENT_NO_ZEROES)
        export = self.options()
        if export is not None:
            self.export_name = export.name
            self.transmission(export)

    def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, opt, rtype, len(data)), data)

    def options(self) -> Export | None:
        while True:
            magic, opt, length = w.OPTION.unpack(self.recv(w.OPTION.size, "an option"))
            if magic != w.IHAVEOPT:
                raise Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                self.reply(opt, w.REP_ERR_TOO_BIG, b"option data too long")
                raise Hangup(f"option {opt} with {length} bytes of data")
            data = self.recv(length, "option data")
            if self.server.stopping():
                self.reply(opt, w.REP_ERR_SHUTDOWN, b"the server is shutting down")
                raise Hangup("")
            if opt == w.OPT_EXPORT_NAME:
                export = self.server.find_export(data.decode("utf-8", "replace"))
                if export is None:       # this option cannot fail: hang up
                    raise Hangup(f"no export {data!r}")
                pad = b"" if self.no_zeroes else bytes(w.EXPORT_NAME_PAD)
                self.send(w.EXPORT_NAME_REPLY.pack(export.size, self._tflags(export)), pad)
                return export
            if opt == w.OPT_ABORT:
                self.reply(opt, w.REP_ACK)
                raise Hangup("")
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

    def _tflags(self, export: Export) -> int:
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

    def opt_info(self, opt: int, data: bytes) -> Export | None:
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
        export = self.server.find_export(name)
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
        export = self.server.find_export(raw.decode("utf-8", "replace"))
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
    def transmission(self, export: Export) -> None:
        vol = export.volume
        structured = self.structured
        has_context = self.context is not None
        server = self.server
        while True:
            head = self.rfile.read(w.REQUEST.size)
            if len(head) != w.REQUEST.size:
                raise Hangup("a truncated request" if head else "")
            magic, flags, cmd, cookie, offset, length = w.REQUEST.unpack(head)
            if magic != w.REQUEST_MAGIC:
                raise Hangup(f"bad request magic {magic:#x}")
            payload = None
            if cmd == w.CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise Hangup(f"a write of {length} bytes (the most is {MAX_PAYLOAD})")
                if length <= SMALL:
                    payload = self.recv(length, "a write's payload")   # bytes: the fast path
                else:
                    payload = self._buffer(length)
                    if self.rfile.readinto(payload) != length:
                        raise Hangup("the client went away in the middle of a write's payload")
            if cmd == w.CMD_DISC:
                return
            try:
                self._check(export, cmd, flags, offset, length, structured, has_context)
                if cmd == w.CMD_READ:
                    if length <= SMALL:          # bytes: the lock-free path of small reads
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
                    self.wrote = True
                    server.note_write()
                    vol.write(offset, payload)
                elif cmd == w.CMD_TRIM:
                    self.wrote = True
                    server.note_write()
                    vol.discard(offset, length)
                elif cmd == w.CMD_WRITE_ZEROES:
                    self.wrote = True
                    server.note_write()
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
                code = error_number(e, cmd)
                if code == w.EIO:
                    log.error("%s of %d bytes at %d on %s failed: %s",
                              w.COMMAND_NAMES.get(cmd, cmd), length, offset, export.name, e)
                self._error_reply(cookie, cmd, code, str(e), structured)
                continue
            self.send(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _check(self, export: Export, cmd: int, flags: int, offset: int, length: int,
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

    def _status_reply(self, cookie: int, export: Export, offset: int, length: int,
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


def error_number(e: ThinpoolError, cmd: int) -> int:
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
