"""Serving a pool's volumes: ``thinpool serve``.

* ``serve POOL`` holds the pool open for writing (through the session, the one opener) and runs
  :class:`~thinpool.export.daemon.Daemon` in the foreground: it prints one NBD URI per export
  once it listens, and SIGINT (Ctrl-C), SIGTERM or SIGHUP stop it cleanly (everything detached,
  committed, its files removed), exit 0.
* ``serve POOL --daemon`` starts that same command as a process of its own (a new session, stdio
  to ``POOL_DIR/serve.log``, working directory ``/``) and returns once it listens, printing its
  URIs; if it fails to start, its error line and exit code are this command's.
* ``serve POOL --stop`` asks the running one over its control socket and waits until its
  process is gone.

While a pool is served, the commands that change volumes (create, snapshot, delete, rename,
resize, configure, revert, merge, discard) are run by the serving process for whoever asks
(:mod:`.forward`); every other command that changes the pool fails with exit 5 naming the
serving process and ``--stop`` (:meth:`~thinpool.cli.app.Session.busy`); ``stat`` shows what is
served.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from thinpool.errors import InvalidArgument, NotFound, ThinpoolError

from . import app, output
from .app import POOL, VOLUME, Session, Target, cli, get_volume, pass_session

STOP_TIMEOUT = 60.0          # seconds --stop waits for the process to be gone
START_TIMEOUT = 60.0         # seconds --daemon waits for the server to listen


class ServeFailed(ThinpoolError):
    """The background ``thinpool serve`` did not start: its own error line and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise InvalidArgument(f"--listen {text!r}: give PORT or HOST:PORT, with a port from 0 "
                              f"to 65535")
    return host, number


@cli.command()
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Unix socket to serve NBD on [default: POOL_DIR/nbd.sock].")
@click.option("--listen", metavar="[HOST:]PORT",
              help="Serve NBD on TCP too (PORT alone: on 127.0.0.1 only).")
@click.option("--read-only", is_flag=True, help="Export every volume read-only.")
@click.option("--export", "exports", multiple=True, metavar="NAME",
              help="Export only this volume (repeat for more) [default: every volume].")
@click.option("--commit-interval", type=float, default=1.0, show_default=True,
              metavar="SECONDS", help="Commit writes at least this often.")
@click.option("--daemon", "background", is_flag=True,
              help="Run in the background; return once it serves.")
@click.option("--stop", is_flag=True, help="Stop the thinpool serve serving POOL.")
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--stop-when-detached", is_flag=True, hidden=True)
@pass_session
def serve(session: Session, target: Target, socket_path: Path | None, listen: str | None,
          read_only: bool, exports: tuple[str, ...], commit_interval: float, background: bool,
          stop: bool, ready_fd: int | None, stop_when_detached: bool) -> None:
    """Serve a pool's volumes over NBD (each volume an export by its name).

    Holds the pool for writing until stopped, committing every --commit-interval seconds and
    at every flush a client asks for. Prints the NBD URI of each export once it serves.

    \b
      thinpool serve demo                       # foreground; Ctrl-C stops it
      thinpool serve demo --daemon --listen 10809
      qemu-img info nbd+unix:///vol0?socket=$THINPOOL_HOME/demo/nbd.sock
      thinpool serve demo --stop
    """
    from thinpool.export.daemon import ServeOptions

    path = session.require_pool(target.pool)
    if stop:
        _stop(session, target.pool, path)
        return
    if not commit_interval > 0:
        raise click.BadParameter("give a number of seconds above 0", param_hint="--commit-interval")
    try:
        tcp = None if listen is None else parse_listen(listen)
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    opts = ServeOptions(socket=None if socket_path is None else socket_path.absolute(), tcp=tcp,
                        read_only=read_only, exports=list(exports) or None,
                        commit_interval=commit_interval,
                        stop_when_detached=stop_when_detached)
    if background:
        _start_background(session, target.pool, path, opts)
        return
    _serve_foreground(session, target.pool, path, opts, ready_fd)


def _serve_foreground(session: Session, name: str, path: Path, opts, ready_fd) -> None:
    from thinpool.export.daemon import Daemon

    with session.pool(name, write=True) as pool:
        from .forward import run_held
        daemon = Daemon(pool, path, opts, run_command=run_held)
        daemon.start()
        with stop_on_signals(daemon):          # (also while it stops: the handlers go last)
            try:
                _announce(daemon, name, ready_fd)
                daemon.wait()
            finally:
                daemon.stop()
    output.note(f"stopped serving pool {name}; everything written is committed")


@contextmanager
def stop_on_signals(daemon):
    """SIGINT, SIGTERM and SIGHUP ask ``daemon`` to stop (its ``wait`` returns) while inside;
    the handlers before are put back on the way out."""
    saved = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, lambda *_: daemon.request_stop())
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _announce(daemon, name: str, ready_fd) -> None:
    """The URIs on stdout, and to the starter's pipe (``--daemon``) or a note for people."""
    uris = daemon.uris()
    for uri in uris:
        output.echo(uri)
    if ready_fd is not None:
        _say_ready(ready_fd, {"pid": os.getpid(), "uris": uris,
                              "socket": daemon.socket_path, "tcp": daemon.tcp})
    else:
        output.note(f"serving pool {name} (process {os.getpid()}); Ctrl-C or "
                    f"'thinpool serve {name} --stop' stops it")


def _say_ready(fd: int, doc: dict) -> None:
    try:
        os.write(fd, json.dumps(doc).encode() + b"\n")
    except OSError:
        pass               # the starter went away: serve on regardless
    finally:
        os.close(fd)


def _start_background(session: Session, name: str, path: Path, opts,
                      quiet: bool = False) -> None:
    from thinpool.export.daemon import LOG_NAME

    session.refuse_if_busy(name)
    argv = [sys.executable, "-m", "thinpool", "--home", str(session.home.absolute()),
            *(["--debug"] if app.DEBUG else []), "serve", name]
    if opts.commit_interval != 1.0:
        argv += ["--commit-interval", repr(opts.commit_interval)]
    if opts.socket is not None:
        argv += ["--socket", str(opts.socket)]
    if opts.tcp is not None:
        argv += ["--listen", f"[{opts.tcp[0]}]:{opts.tcp[1]}"]
    if opts.read_only:
        argv.append("--read-only")
    for e in opts.exports or ():
        argv += ["--export", e]
    if opts.stop_when_detached:
        argv.append("--stop-when-detached")
    log_path = path / LOG_NAME
    try:
        log = open(log_path, "ab")
    except OSError as e:
        raise InvalidArgument(f"cannot write {log_path}: {e.strerror}") from None
    start = log.tell()
    r, w = os.pipe()
    try:
        with log:
            p = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=(w,), cwd="/",
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as ready:
        line = ready.readline()          # the child closes its end once it serves (or dies)
    if line:
        doc = json.loads(line)
        if quiet:
            return
        for uri in doc["uris"]:
            output.echo(uri)
        output.note(f"serving pool {name} in the background (process {doc['pid']}, log "
                    f"{log_path}); 'thinpool serve {name} --stop' stops it")
        return
    try:
        code = p.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        code = p.wait()
    raise ServeFailed(_last_error(log_path, start) or
                      f"thinpool serve exited with status {code} before it served; see "
                      f"{log_path}", code or 1)


def _last_error(log_path: Path, start: int) -> str | None:
    """The last ``thinpool: ...`` line the child wrote to the log, without the prefix."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if ln.startswith(f"{output.PREFIX}: ")]
    return lines[-1][len(output.PREFIX) + 2:] if lines else None


def _stop(session: Session, name: str, path: Path) -> None:
    from thinpool.export.state import ask, pid_alive, read_state

    state = read_state(path)
    if state is None:
        raise NotFound(f"pool {name!r} is not being served (no running 'thinpool serve {name}')")
    pid = state["pid"]
    answer = ask(path, {"op": "stop"})
    if not answer.get("ok"):
        raise ServeFailed(answer.get("error", "thinpool serve refused to stop"),
                          int(answer.get("exit_code", 1)))
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise ThinpoolError(f"thinpool serve (process {pid}) said it stops but was still "
                                f"running after {STOP_TIMEOUT:g} s")
        time.sleep(0.02)
    output.echo(f"stopped thinpool serve of pool {name} (process {pid})")


# -- attach / detach -----------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL/VOL", type=VOLUME)
@click.option("--read-only", is_flag=True, help="Attach read-only (a read-only volume always is).")
@click.option("--json", "as_json", is_flag=True, help="Print the attachment as JSON.")
@pass_session
def attach(session: Session, target: Target, read_only: bool, as_json: bool) -> None:
    """Give a volume a block device: /dev/loopN over a FUSE file that is the volume.

    The pool's thinpool serve (started in the background if none runs; it then stops once
    its last volume is detached) holds the file. Prints the loop device.

    \b
      thinpool attach demo/vol0                   # /dev/loop3
      mkfs.ext4 /dev/loop3 && mount /dev/loop3 /mnt
      umount /mnt && thinpool detach demo/vol0
    """
    from thinpool.export.daemon import ServeOptions
    from thinpool.export.state import ask, read_state

    path = session.require_pool(target.pool)
    started = False
    if read_state(path) is None:
        with session.pool(target.pool, quiet=True) as pool:     # before a server is started
            get_volume(pool, target)
        session.refuse_if_busy(target.pool)
        _start_background(session, target.pool, path, ServeOptions(stop_when_detached=True),
                          quiet=True)
        started = True
    answer = ask(path, {"op": "attach", "volume": target.volume, "read_only": read_only})
    if not answer.get("ok"):
        if started:
            _stop_quietly(path)
        raise ServeFailed(answer.get("error", "thinpool serve did not attach it"),
                          int(answer.get("exit_code", 1)))
    loop = answer["loop_device"]
    if as_json:
        output.emit_json({"pool": target.pool, "volume": target.volume, "loop_device": loop,
                          "read_only": bool(answer.get("read_only", read_only))})
    else:
        output.echo(loop)
    if sys.stderr.isatty():         # a hint for people; scripts get the device alone
        output.note(f"{target} is attached at {loop}; 'thinpool detach {target}' detaches it "
                    f"(unmount any filesystem on it first)")


@cli.command()
@click.argument("what", metavar="POOL/VOL|/dev/loopN")
@pass_session
def detach(session: Session, what: str) -> None:
    """Take a volume's loop device away again (after its filesystem is unmounted).

    The safe order: sync, losetup -d, wait until the loop device is gone, unmount the FUSE
    file. Refused (exit 5) while a filesystem on the loop device is mounted.

    \b
      thinpool detach demo/vol0
      thinpool detach /dev/loop3
    """
    from thinpool.export.state import ask, pid_alive, read_state

    if what.startswith("/dev/"):
        found = _attached_at(session, what)
        if found is None:
            raise NotFound(f"{what} is not a volume attached by thinpool (in {session.home})")
        target = found
    else:
        target = app.parse_target(what, volume=True)
    path = session.require_pool(target.pool)
    state = read_state(path)
    if state is None:
        raise NotFound(f"volume {target} is not attached (pool {target.pool} is not served)")
    answer = ask(path, {"op": "detach", "volume": target.volume})
    if not answer.get("ok"):
        raise ServeFailed(answer.get("error", "thinpool serve did not detach it"),
                          int(answer.get("exit_code", 1)))
    loop = next((v.get("attached") for v in state.get("volumes", ())
                 if v.get("name") == target.volume), None)
    if answer.get("stopping"):                 # it was started by attach: wait until it is gone
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    output.echo(f"detached {target}" + (f" from {loop}" if loop else ""))


def _attached_at(session: Session, device: str) -> Target | None:
    from thinpool.export.state import read_state
    real = os.path.realpath(device)
    for name in session.pool_names():
        state = read_state(session.pool_path(name))
        for v in (state or {}).get("volumes", ()):
            if v.get("attached") and os.path.realpath(v["attached"]) == real:
                return Target(name, v["name"])
    return None


def _stop_quietly(path: Path) -> None:
    from thinpool.export.state import ask
    try:
        ask(path, {"op": "stop"})
    except ThinpoolError:
        pass
