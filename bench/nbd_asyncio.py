"""A bench probe, not product code: a minimal asyncio NBD server over one thinpool volume.

It exists to answer one question with a measurement (workload 13, ``bench/test_nbd_asyncio.py``):
would an asyncio server, receiving straight into reused buffers, move data faster than the
thread-per-connection server of :mod:`thinpool.export.nbd`? It uses thinpool's public API only
(``Pool.open``, ``pool.volume``, ``Volume.read_into``/``write``/``discard``/``flush``, ``size``,
``pool.commit``) and the wire constants of :mod:`thinpool.export.nbd_wire`.

    python -m bench.nbd_asyncio --home HOME POOL VOL SOCKET [--executor] [--commit-interval S]
                                [--sndbuf BYTES]

Contract:

* **Protocol.** Fixed newstyle handshake (client flags checked; NO_ZEROES honoured). Options:
  GO and INFO (``INFO_EXPORT`` and ``INFO_BLOCK_SIZE``: 1, the pool's block size, 32 MiB), the
  export named VOL or ``""``, else ERR_UNKNOWN; EXPORT_NAME (an unknown name hangs up); ABORT (ACK,
  then close); every other option ERR_UNSUP, and the handshake goes on. So no structured replies
  and no ``base:allocation``: simple replies only. Transmission flags HAS_FLAGS, SEND_FLUSH,
  SEND_TRIM, CAN_MULTI_CONN. Commands READ, WRITE, FLUSH, TRIM (``Volume.discard``: the benchmark
  empties the target with ``qemu-io -c discard``) and DISC; any other command or flag, a request
  past the end of the volume and a READ above 32 MiB get EINVAL (ENOSPC for a write past the
  end); a FUA flag is honoured with a flush. Library errors become NBD errors as in the real
  server (``nbd_conn.error_number``). Bad magic, a WRITE above 32 MiB or option data above
  64 KiB close the connection.
* **Buffers.** :class:`Connection` is an ``asyncio.BufferedProtocol``: request headers and option
  data are received into a small buffer (4 KiB, grown only for option data), several at a time;
  a WRITE payload is received straight into the connection's reused payload buffer (only the
  bytes that arrived with the header, under 4 KiB, are copied there). A READ is read with
  ``Volume.read_into`` into a reused reply buffer behind a 16-byte header slot and sent with one
  ``transport.write``. No new request is parsed while the transport's unsent bytes are above its
  high-water mark (64 KiB: write flow control; reading pauses too), so replies do not pile up in
  the transport's own buffer.
  What one send does not take, the transport copies and sends later: with the default socket
  buffer (208 KiB here) that is part of every 256 KiB reply. ``--sndbuf`` sets SO_SNDBUF of each
  connection (capped by ``net.core.wmem_max``) so that whole replies fit.
* **Where Volume calls run.** Inline in the event loop (default: page-cache I/O is fast), or, with
  ``--executor``, in a thread pool of 4, one request of a connection at a time (reading from the
  connection pauses meanwhile, so its buffers stay the request's). The periodic commit and the
  commit of a closing connection run where the Volume calls do.
* **Durability, as ``thinpool serve`` with its default ``--commit-interval 1``:** FLUSH (and FUA)
  commits before its reply; ``pool.commit(wait=False)`` every ``--commit-interval`` seconds while
  writes came in; a commit when a connection that wrote closes; on SIGTERM or SIGINT: stop
  accepting, close the connections, commit, close the pool, remove the socket, exit 0.

Logs (warnings and errors) go to stderr; it prints nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from thinpool import Pool
from thinpool.errors import ThinpoolError
from thinpool.export import nbd_wire as w
from thinpool.export.nbd_conn import error_number

log = logging.getLogger("bench.nbd_asyncio")

MAX_PAYLOAD = 32 << 20
MAX_OPTION = 64 << 10
HEAD_BUF = 4096
THREADS = 4
_TFLAGS = w.TF_HAS_FLAGS | w.TF_SEND_FLUSH | w.TF_SEND_TRIM | w.TF_CAN_MULTI_CONN
_KNOWN_FLAGS = w.CMD_FLAG_FUA
_HANDSHAKE, _OPTIONS, _TRANSMISSION, _CLOSED = range(4)


class _Hangup(Exception):
    """Close the connection (bad peer, or the client asked)."""


class Server:
    """The export (one volume), the commit timer and the live connections."""

    def __init__(self, pool: Pool, name: str, executor: ThreadPoolExecutor | None,
                 commit_interval: float, sndbuf: int = 0):
        self.pool = pool
        self.sndbuf = sndbuf
        self.name = name
        self.vol = pool.volume(name)
        self.size = self.vol.size
        self.executor = executor
        self.commit_interval = commit_interval
        self.dirty = False
        self.committing = False
        self.connections: set[Connection] = set()
        self.loop = asyncio.get_running_loop()
        self.timer = self.loop.call_later(commit_interval, self._tick)

    def _commit(self, wait: bool) -> None:
        try:
            if not self.pool.commit(wait=wait):
                self.dirty = True
        except ThinpoolError as e:
            log.error("commit failed: %s", e)

    def _tick(self) -> None:
        self.timer = self.loop.call_later(self.commit_interval, self._tick)
        if not self.dirty or self.committing:
            return
        self.dirty = False
        if self.executor is None:
            self._commit(wait=False)
            return
        self.committing = True
        fut = self.loop.run_in_executor(self.executor, self._commit, False)
        fut.add_done_callback(lambda _: setattr(self, "committing", False))

    def connection_closed(self, conn: "Connection") -> None:
        self.connections.discard(conn)
        if conn.wrote:
            if self.executor is None:
                self._commit(wait=True)
            else:
                self.loop.run_in_executor(self.executor, self._commit, True)


class Connection(asyncio.BufferedProtocol):
    """One client: the handshake, then requests in order (see the module docstring)."""

    def __init__(self, server: Server):
        self.server = server
        self.vol = server.vol
        self.size = server.size
        self.inbuf = bytearray(HEAD_BUF)    # headers and option data, [0, inlen) valid
        self.inlen = 0
        self.sink: memoryview | None = None  # a WRITE payload being received
        self.sink_pos = 0
        self.pending: tuple[int, int, int, int] | None = None   # that WRITE's flags, cookie...
        self.payload = memoryview(bytearray(0))
        self.reply = memoryview(bytearray(0))
        self.state = _HANDSHAKE
        self.no_zeroes = False
        self.busy = False                   # a request is in the executor
        self.write_paused = False
        self.reading = True
        self.wrote = False
        self.transport: asyncio.Transport | None = None

    # -- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        if self.server.sndbuf:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                          self.server.sndbuf)
        transport.write(w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT,
                                        w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))

    def connection_lost(self, exc) -> None:
        self.state = _CLOSED
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._run()

    def get_buffer(self, sizehint: int):
        if self.sink is not None:
            return self.sink[self.sink_pos:]
        if self.inlen == len(self.inbuf):    # option data longer than the buffer: a bigger one
            bigger = bytearray(2 * len(self.inbuf))
            bigger[:self.inlen] = self.inbuf
            self.inbuf = bigger
        return memoryview(self.inbuf)[self.inlen:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.sink is not None:
            self.sink_pos += nbytes
            if self.sink_pos < len(self.sink):
                return
            self.sink = None
            flags, cookie, offset, length = self.pending
            self.pending = None
            self._request(w.CMD_WRITE, flags, cookie, offset, length,
                          self.payload[:length])
        else:
            self.inlen += nbytes
        self._run()

    # -- parsing ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._parse()
        except _Hangup as e:
            if str(e):
                log.warning("closing a connection: %s", e)
            self.state = _CLOSED
            self.transport.close()
        self._update_reading()

    def _update_reading(self) -> None:
        want = not self.busy and not self.write_paused and self.state != _CLOSED
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _parse(self) -> None:
        buf = self.inbuf
        pos, end = 0, self.inlen
        try:
            while (not self.busy and self.sink is None and not self.write_paused
                   and self.state != _CLOSED):
                if self.state == _TRANSMISSION:
                    if end - pos < w.REQUEST.size:
                        break
                    magic, flags, cmd, cookie, offset, length = w.REQUEST.unpack_from(buf, pos)
                    pos += w.REQUEST.size
                    if magic != w.REQUEST_MAGIC:
                        raise _Hangup(f"bad request magic {magic:#x}")
                    if cmd == w.CMD_WRITE:
                        if length > MAX_PAYLOAD:
                            raise _Hangup(f"a write of {length} bytes")
                        here = min(length, end - pos)
                        if here == length:       # all of it came with the header: small
                            data = bytes(buf[pos:pos + length])
                            pos += length
                            self._request(cmd, flags, cookie, offset, length, data)
                            continue
                        if len(self.payload) < length:
                            self.payload = memoryview(bytearray(1 << (length - 1).bit_length()))
                        self.payload[:here] = buf[pos:pos + here]
                        pos += here
                        self.sink = self.payload[:length]
                        self.sink_pos = here
                        self.pending = (flags, cookie, offset, length)
                        break
                    self._request(cmd, flags, cookie, offset, length, None)
                elif self.state == _HANDSHAKE:
                    if end - pos < 4:
                        break
                    (cflags,) = w.CLIENT_FLAGS.unpack_from(buf, pos)
                    pos += 4
                    if cflags & ~w.CLIENT_KNOWN or not cflags & w.CLIENT_FIXED_NEWSTYLE:
                        raise _Hangup(f"client flags {cflags:#x}")
                    self.no_zeroes = bool(cflags & w.CLIENT_NO_ZEROES)
                    self.state = _OPTIONS
                else:
                    if end - pos < w.OPTION.size:
                        break
                    magic, opt, length = w.OPTION.unpack_from(buf, pos)
                    if magic != w.IHAVEOPT:
                        raise _Hangup(f"bad option magic {magic:#x}")
                    if length > MAX_OPTION:
                        self._opt_reply(opt, w.REP_ERR_TOO_BIG)
                        raise _Hangup(f"option data of {length} bytes")
                    if end - pos < w.OPTION.size + length:
                        break
                    data = bytes(buf[pos + w.OPTION.size: pos + w.OPTION.size + length])
                    pos += w.OPTION.size + length
                    self._option(opt, data)
        finally:
            rest = end - pos                      # keep what is not parsed yet, at the start
            if pos:
                buf[:rest] = buf[pos:end]
            self.inlen = rest

    # -- handshake ---------------------------------------------------------------------------------
    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.transport.write(w.OPTION_REPLY.pack(w.OPTION_REPLY_MAGIC, opt, rtype, len(data))
                             + data)

    def _known(self, name: bytes) -> bool:
        return name in (b"", self.server.name.encode())

    def _option(self, opt: int, data: bytes) -> None:
        if opt == w.OPT_EXPORT_NAME:
            if not self._known(data):
                raise _Hangup(f"no export {data!r}")
            pad = b"" if self.no_zeroes else bytes(w.EXPORT_NAME_PAD)
            self.transport.write(w.EXPORT_NAME_REPLY.pack(self.size, _TFLAGS) + pad)
            self.state = _TRANSMISSION
        elif opt == w.OPT_ABORT:
            self._opt_reply(opt, w.REP_ACK)
            raise _Hangup("")
        elif opt in (w.OPT_GO, w.OPT_INFO):
            ok = len(data) >= 6
            if ok:
                (n,) = w.U32.unpack_from(data, 0)
                ok = len(data) >= 6 + n
            if ok:
                (nreq,) = w.U16.unpack_from(data, 4 + n)
                ok = len(data) == 6 + n + 2 * nreq
            if not ok:
                self._opt_reply(opt, w.REP_ERR_INVALID, b"malformed INFO/GO request")
                return
            name = data[4:4 + n]
            if not self._known(name):
                self._opt_reply(opt, w.REP_ERR_UNKNOWN, b"no such export")
                return
            self._opt_reply(opt, w.REP_INFO,
                            w.INFO_EXPORT_PAYLOAD.pack(w.INFO_EXPORT, self.size, _TFLAGS))
            bs = self.server.pool.block_size
            preferred = bs if bs & (bs - 1) == 0 and bs <= MAX_PAYLOAD else 4096
            self._opt_reply(opt, w.REP_INFO, w.INFO_BLOCK_SIZE_PAYLOAD.pack(
                w.INFO_BLOCK_SIZE, 1, preferred, MAX_PAYLOAD))
            self._opt_reply(opt, w.REP_ACK)
            if opt == w.OPT_GO:
                self.state = _TRANSMISSION
        else:
            self._opt_reply(opt, w.REP_ERR_UNSUP, b"not supported")

    # -- requests -------------------------------------------------------------------------------
    def _request(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                 data) -> None:
        """Check one request, then run it inline or hand it to the executor."""
        if cmd == w.CMD_DISC:
            raise _Hangup("")
        error = 0
        if cmd not in (w.CMD_READ, w.CMD_WRITE, w.CMD_FLUSH, w.CMD_TRIM) or flags & ~_KNOWN_FLAGS:
            error = w.EINVAL
        elif cmd != w.CMD_FLUSH and offset + length > self.size:
            error = w.ENOSPC if cmd == w.CMD_WRITE else w.EINVAL
        elif cmd == w.CMD_READ and length > MAX_PAYLOAD:
            error = w.EINVAL
        if error:
            self.transport.write(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie))
            return
        if cmd in (w.CMD_WRITE, w.CMD_TRIM):
            self.wrote = True
            self.server.dirty = True
        if cmd == w.CMD_READ and len(self.reply) < 16 + length:
            self.reply = memoryview(bytearray(16 + (1 << max(length - 1, 0).bit_length())))
        executor = self.server.executor
        if executor is None:
            self._reply(cmd, cookie, length, self._do(cmd, flags, offset, length, data))
            return
        self.busy = True
        fut = self.server.loop.run_in_executor(executor, self._do, cmd, flags, offset, length,
                                               data)
        fut.add_done_callback(lambda f: self._done(f, cmd, cookie, length))

    def _do(self, cmd: int, flags: int, offset: int, length: int, data) -> int:
        """The Volume call of one request (in the loop or in a worker): its NBD error or 0.
        A READ's data is left in ``self.reply[16:16 + length]``."""
        vol = self.vol
        try:
            if cmd == w.CMD_READ:
                if length:
                    vol.read_into(offset, self.reply[16:16 + length])
            elif cmd == w.CMD_WRITE:
                vol.write(offset, data)
            elif cmd == w.CMD_TRIM:
                vol.discard(offset, length)
            if cmd == w.CMD_FLUSH or flags & w.CMD_FLAG_FUA:
                vol.flush()
        except ThinpoolError as e:
            return error_number(e, cmd)
        return 0

    def _done(self, fut, cmd: int, cookie: int, length: int) -> None:
        self.busy = False
        if self.state == _CLOSED:
            return
        exc = fut.exception()
        if exc is not None:
            log.error("request failed: %r", exc)
            self.state = _CLOSED
            self.transport.close()
            return
        self._reply(cmd, cookie, length, fut.result())
        self._run()

    def _reply(self, cmd: int, cookie: int, length: int, error: int) -> None:
        if self.state == _CLOSED:
            return
        if error or cmd != w.CMD_READ:          # a failed READ: the header alone
            self.transport.write(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, error, cookie))
            return
        w.SIMPLE_REPLY.pack_into(self.reply, 0, w.SIMPLE_REPLY_MAGIC, 0, cookie)
        self.transport.write(self.reply[:16 + length])


# -- the process -----------------------------------------------------------------------------------
async def serve(home: Path, pool_name: str, vol_name: str, socket_path: str, use_executor: bool,
                commit_interval: float, sndbuf: int = 0) -> None:
    pool = Pool.open(home / pool_name)
    executor = ThreadPoolExecutor(THREADS, thread_name_prefix="nbd-io") if use_executor else None
    listener = None
    server = None
    try:
        pool.wait_for_space = True
        server = Server(pool, vol_name, executor, commit_interval, sndbuf)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        listener = await loop.create_unix_server(lambda: Connection(server), socket_path,
                                                 backlog=64)
        await stop.wait()
    finally:
        if listener is not None:
            listener.close()
            for conn in list(server.connections):
                conn.transport.abort()
            await listener.wait_closed()
            await asyncio.sleep(0)               # let connection_lost run
        if server is not None:
            server.timer.cancel()
        if executor is not None:
            executor.shutdown(wait=True)
        try:
            pool.commit(wait=True)
        finally:
            pool.close()
            try:
                os.unlink(socket_path)
            except OSError:
                pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nbd_asyncio",
                                     description="A bench probe: an asyncio NBD server of one "
                                                 "thinpool volume on a Unix socket.")
    parser.add_argument("--home", type=Path, required=True, help="the pools' directory")
    parser.add_argument("pool")
    parser.add_argument("volume")
    parser.add_argument("socket")
    parser.add_argument("--executor", action="store_true",
                        help="run the Volume calls in a thread pool, not in the event loop")
    parser.add_argument("--commit-interval", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--sndbuf", type=int, default=0, metavar="BYTES",
                        help="SO_SNDBUF of each connection (default: the system's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="nbd_asyncio: %(levelname)s %(message)s")
    asyncio.run(serve(args.home, args.pool, args.volume, args.socket, args.executor,
                      args.commit_interval, args.sndbuf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
