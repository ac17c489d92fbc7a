"""The records a running ``thinpool serve`` keeps in its pool's directory, for other processes.

``POOL_DIR/exports.json`` (the state: pid, sockets, what is served), ``serve.pid``, ``serve.log``,
``nbd.sock`` (the NBD socket unless another was given) and ``control.sock`` (one JSON request per
line, one JSON answer per line). :func:`read_state` reads the state and trusts it only while its
pid holds the pool's writer lock (so a dead daemon's leftovers, or a pid reused since, count as
nothing); :func:`ask` sends one control request. Both read and change nothing else; neither
prints. :func:`clear_stale_socket` removes a socket file a dead process left before a new server
binds there (the daemon's, and the container runtime's gRPC service). Light on imports:
``thinpool stat`` and the busy message use it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from thinpool.errors import BusyError, InvalidArgument, NotFound, ThinpoolError
from thinpool.locking import writer_of

PID_NAME = "serve.pid"
STATE_NAME = "exports.json"
LOG_NAME = "serve.log"
SOCKET_NAME = "nbd.sock"
CONTROL_NAME = "control.sock"
RUN_NAME = "run"                 # FUSE mountpoints of attached volumes go below it
MAX_REQUEST = 64 << 10           # a control request or answer line longer than this is refused
SOCKET_PATH_MAX = 107            # sun_path holds 108 bytes with the terminating NUL


def check_socket_path(path) -> str:
    """``path`` as text if a Unix socket can be bound there; InvalidArgument if it is too long."""
    import os
    text = os.fspath(path)
    if len(os.fsencode(text)) > SOCKET_PATH_MAX:
        raise InvalidArgument(f"socket path {text} is {len(os.fsencode(text))} bytes long, more "
                              f"than a Unix socket address holds ({SOCKET_PATH_MAX}): give a "
                              f"shorter one")
    return text


def clear_stale_socket(path) -> None:
    """Remove a socket a dead process left at ``path`` (nobody accepts on it); refuse a live one
    (BusyError) or another kind of file (InvalidArgument). Nothing at ``path`` is fine."""
    import os
    import stat
    path = check_socket_path(path)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket; give another path")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)            # nobody listens: stale
        return
    finally:
        s.close()
    raise BusyError(f"something already listens on {path}; give another socket path")


def nbd_uri(name: str, socket_path: str | None = None, tcp: str | None = None) -> str:
    """The NBD URI of export ``name`` on a Unix socket or at ``HOST:PORT``."""
    from urllib.parse import quote
    if socket_path is not None:
        return f"nbd+unix:///{quote(name)}?socket={quote(socket_path, safe='/')}"
    host, _, port = tcp.rpartition(":")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"nbd://{host}:{port}/{quote(name)}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_state(pool_dir) -> dict | None:
    """The state file of the daemon serving ``pool_dir``, or None when none is (no file, a
    damaged one, or one whose pid no longer holds the pool's writer lock)."""
    pool_dir = Path(pool_dir)
    try:
        state = json.loads((pool_dir / STATE_NAME).read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from thinpool.config import pool_files
    try:
        metadata = pool_files(pool_dir)[0]
    except ThinpoolError:
        return None
    if not pid_alive(pid) or writer_of(metadata) != pid:
        return None
    return state


def ask(pool_dir, request: dict, timeout: float = 60.0) -> dict:
    """Send one request to the control socket of the daemon serving ``pool_dir``; its answer.
    NotFound when no daemon answers there."""
    path = check_socket_path(Path(pool_dir) / CONTROL_NAME)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise NotFound(f"no thinpool serve answers on {path} ({e.strerror or e})") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline(MAX_REQUEST)
    except socket.timeout:
        raise ThinpoolError(f"thinpool serve did not answer on {path} within "
                            f"{timeout:g} s") from None
    finally:
        s.close()
    try:
        return json.loads(line)
    except ValueError:
        raise ThinpoolError(f"thinpool serve answered nothing readable on {path}") from None
