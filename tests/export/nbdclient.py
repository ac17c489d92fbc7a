"""A small NBD client for the tests: every option and command, and the wrong moves real
clients never make (raw bytes out, whatever the server answers back).

It uses the project's own wire layouts (thinpool.export.nbd_wire) for framing, so a test of a
layout's *value* must compare with a number written in the test itself.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from thinpool.export import nbd_wire as w


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes

    @property
    def error(self) -> bool:
        return bool(self.type & w.REP_ERR)


@dataclass
class Reply:
    cookie: int
    error: int = 0
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)       # chunk types, structured
    message: str = ""


class NBDClient:
    def __init__(self, path: str, timeout: float = 10.0, flags: int = 3):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        magic, opt, self.hflags = w.GREETING.unpack(self.recv(18))
        assert (magic, opt) == (0x4E42444D41474943, 0x49484156454F5054)
        self.sock.sendall(struct.pack(">I", flags))
        self.cflags = flags
        self.structured = False
        self.size = None
        self.tflags = None
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "NBDClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bytes -----------------------------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True when the server has closed (EOF within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # -- options ---------------------------------------------------------------------------------
    def send_option(self, opt: int, data: bytes = b"", length: int | None = None) -> None:
        self.sock.sendall(w.OPTION.pack(w.IHAVEOPT, opt, len(data) if length is None else length)
                          + data)

    def opt_reply(self) -> OptReply:
        magic, opt, rtype, n = w.OPTION_REPLY.unpack(self.recv(20))
        assert magic == 0x0003E889045565A9, hex(magic)
        return OptReply(opt, rtype, self.recv(n))

    def option(self, opt: int, data: bytes = b"") -> list[OptReply]:
        """Send an option, read replies up to the final one (ACK or an error)."""
        self.send_option(opt, data)
        out = []
        while True:
            r = self.opt_reply()
            assert r.option == opt
            out.append(r)
            if r.type == w.REP_ACK or r.error:
                return out

    def structured_reply(self) -> list[OptReply]:
        r = self.option(w.OPT_STRUCTURED_REPLY)
        if r[-1].type == w.REP_ACK:
            self.structured = True
        return r

    @staticmethod
    def info_data(name: str, infos=()) -> bytes:
        raw = name.encode()
        return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    @staticmethod
    def meta_data(name: str, queries) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q)) + q
        return out

    def go(self, name: str, infos=(w.INFO_BLOCK_SIZE,), opt: int = w.OPT_GO) -> list[OptReply]:
        replies = self.option(opt, self.info_data(name, infos))
        for r in replies:
            if r.type == w.REP_INFO and struct.unpack_from(">H", r.data)[0] == w.INFO_EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", r.data)
        return replies

    def export_name(self, name: str) -> None:
        self.send_option(w.OPT_EXPORT_NAME, name.encode())
        self.size, self.tflags = struct.unpack(">QH", self.recv(10))
        if not (self.hflags & self.cflags & w.FLAG_NO_ZEROES):
            self.recv(124)

    def connect(self, name: str, structured: bool = True, context: bool = True) -> None:
        if structured:
            self.structured_reply()
            if context:
                r = self.option(w.OPT_SET_META_CONTEXT,
                                self.meta_data(name, [b"base:allocation"]))
                assert r[-1].type == w.REP_ACK, r
        r = self.go(name)
        assert r[-1].type == w.REP_ACK, r

    # -- commands --------------------------------------------------------------------------------
    def send_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                     payload: bytes = b"", cookie: int | None = None, magic: int = w.REQUEST_MAGIC
                     ) -> int:
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.sock.sendall(w.REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def reply(self, cmd: int, length: int = 0) -> Reply:
        """Read one whole reply (all chunks of a structured one)."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == w.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(length) if cmd == w.CMD_READ and err == 0 and length else b""
            return Reply(cookie, err, data)
        assert magic == w.STRUCTURED_REPLY_MAGIC, hex(magic)
        rep = None
        data = bytearray()
        while True:
            flags, ctype, cookie, n = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(n)
            if rep is None:
                rep = Reply(cookie)
            assert cookie == rep.cookie
            rep.chunks.append(ctype)
            if ctype == w.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", body)
                data += body[8:]
            elif ctype == w.REPLY_TYPE_BLOCK_STATUS:
                for i in range(4, n, 8):
                    rep.extents.append(struct.unpack_from(">II", body, i))
            elif ctype & 0x8000:
                rep.error, mlen = struct.unpack_from(">IH", body)
                rep.message = body[6:6 + mlen].decode()
            if flags & w.REPLY_FLAG_DONE:
                rep.data = bytes(data)
                return rep
            magic2 = struct.unpack(">I", self.recv(4))[0]
            assert magic2 == w.STRUCTURED_REPLY_MAGIC

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> Reply:
        cookie = self.send_request(cmd, offset, length, flags, payload)
        r = self.reply(cmd, length)
        assert r.cookie == cookie
        return r

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(w.CMD_READ, offset, length, flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.request(w.CMD_WRITE, offset, len(data), flags, data)

    def flush(self) -> Reply:
        return self.request(w.CMD_FLUSH)

    def trim(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(w.CMD_TRIM, offset, length, flags)

    def zero(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(w.CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(w.CMD_BLOCK_STATUS, offset, length, flags)

    def disconnect(self) -> None:
        self.send_request(w.CMD_DISC)
