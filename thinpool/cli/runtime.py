"""The container runtime backend on the command line: ``snapshotter``, ``runtime``, ``image``,
``container`` and ``volume`` (thinpool/runtime/).

* ``snapshotter serve POOL --socket PATH``: containerd's proxy snapshotter (gRPC) over the pool,
  in the foreground; the same process is the pool's ``thinpool serve`` (NBD, the control socket,
  the loop attachments containerd mounts), so every command below run meanwhile is run by it.
* ``runtime ls|usage|cleanup|configure POOL``: the snapshots (containerd's and the command
  line's), what each adds to its parent, deleting what no snapshot owns, Docker-devicemapper
  style options (base size, filesystem, mkfs/mount options, minimum free space, deferred
  removal), kept in the pool's runtime records.
* ``image import POOL NAME LAYER.tar ...`` / ``image delete``, ``container create POOL NAME
  --image IMAGE`` / ``mount POOL/NAME DIR [--volume VOL:PATH]`` / ``unmount`` / ``delete``,
  ``volume create POOL NAME --size S`` / ``delete``: the seed's workflow without containerd.

Commands that need block devices (image import, container create/mount/unmount, volume create/
delete) run in the pool's serving process: when none runs, one is started in the background
(it stops by itself once the command leaves nothing attached), and the command is sent there
with its paths made absolute (:mod:`.forward`). The others run here, or there when the pool is
served. Errors are the library's (exit 1, 2, 4, 5 as usual; "has children" and "busy" are 5).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import click

from thinpool.errors import BusyError, InvalidArgument

from . import output
from .app import POOL, SIZE, VOLUME, Session, Target, cli, pass_session


# -- where a command runs ---------------------------------------------------------------------
def _held_daemon(session: Session, name: str):
    from . import forward
    held = forward.HELD
    if held is not None and held.holds(session.require_pool(name)):
        return held
    return None


def _snapshotter_of(held):
    """The serving process's snapshotter (made once, kept on its daemon)."""
    from thinpool.runtime.snapshotter import DaemonDevices, Snapshotter
    snap = getattr(held.daemon, "runtime", None)
    if snap is None:
        snap = Snapshotter(held.pool, held.pool_dir, DaemonDevices(held.daemon))
        held.daemon.runtime = snap
    return snap


@contextmanager
def runtime_of(session: Session, name: str, argv: list[str] | None = None):
    """The pool's snapshotter for one command. ``argv`` given: the command needs block
    devices, so it runs in the pool's serving process (started when none runs) with that
    command line."""
    from . import forward
    held = _held_daemon(session, name)
    if held is not None:
        yield _snapshotter_of(held)
        return
    path = session.require_pool(name)
    if argv is not None:
        raise forward.Forward(path, _serving_pid(session, name, path), session.home, argv=argv)
    from thinpool.runtime.snapshotter import Snapshotter
    with session.pool(name, write=True) as pool:
        snap = Snapshotter(pool, path, None)
        for note in snap.notes:
            output.note(f"pool {name}: {note}")
        yield snap


def _serving_pid(session: Session, name: str, path: Path) -> int:
    """The pid of the pool's serving process, one started in the background when none runs
    (after waiting for one that is stopping to be gone)."""
    from thinpool.errors import ThinpoolError
    from thinpool.export.daemon import ServeOptions
    from thinpool.export.state import ask, pid_alive, read_state

    from .exports import STOP_TIMEOUT, _start_background
    state = read_state(path)
    if state is not None:
        try:
            answer = ask(path, {"op": "status"})
        except ThinpoolError:
            answer = {}
        if answer.get("ok") and not answer.get("stopping"):
            return int(answer["pid"])
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    session.refuse_if_busy(name)
    _start_background(session, name, path, ServeOptions(stop_when_detached=True), quiet=True)
    state = read_state(path)
    return int(state["pid"]) if state else 0


# -- snapshotter serve -------------------------------------------------------------------------
@cli.group()
def snapshotter() -> None:
    """containerd's proxy snapshotter over a pool."""


@snapshotter.command("serve")
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--socket", "socket_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The Unix socket containerd's [proxy_plugins] entry names.")
@click.option("--workers", type=click.IntRange(1, 64), default=8, show_default=True,
              help="gRPC calls served at once.")
@pass_session
def snapshotter_serve(session: Session, target: Target, socket_path: Path, workers: int) -> None:
    """Serve containerd's snapshots API for POOL on a Unix socket, in the foreground.

    \b
    containerd's config.toml:
      [proxy_plugins.thinpool]
        type = "snapshot"
        address = "/run/thinpool/demo.sock"
    then: ctr run --snapshotter thinpool IMAGE ID ...
    """
    from thinpool.export.daemon import Daemon, ServeOptions
    from thinpool.runtime.grpc_service import serve as grpc_serve
    from thinpool.runtime.snapshotter import DaemonDevices, Snapshotter

    from .exports import stop_on_signals
    from .forward import run_held

    path = session.require_pool(target.pool)
    with session.pool(target.pool, write=True) as pool:
        daemon = Daemon(pool, path, ServeOptions(), run_command=run_held)
        daemon.start()
        server = None
        with stop_on_signals(daemon):          # (also while it stops: the handlers go last)
            try:
                snap = Snapshotter(pool, path, DaemonDevices(daemon))
                daemon.runtime = snap
                for note in snap.notes:
                    output.note(f"pool {target.pool}: {note}")
                server = grpc_serve(snap, str(socket_path.absolute()), max_workers=workers)
                output.echo(f"unix://{socket_path.absolute()}")
                output.note(f"serving pool {target.pool} to containerd (process {os.getpid()}); "
                            f"Ctrl-C stops it")
                output.flush()
                daemon.wait()
            finally:
                try:
                    if server is not None:
                        server.stop(grace=5).wait(10)
                finally:
                    daemon.stop()
    output.note(f"stopped serving pool {target.pool}; everything written is committed")


# -- runtime ls / usage / cleanup / configure ----------------------------------------------------
@cli.group()
def runtime() -> None:
    """The pool's container snapshots: list, usage, cleanup, options."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@runtime.command("ls")
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--json", "as_json", is_flag=True)
@pass_session
def runtime_ls(session: Session, target: Target, as_json: bool) -> None:
    """List the snapshots (key, kind, parent, volume), data volumes and images."""
    with runtime_of(session, target.pool) as snap:
        rows = []
        for info in snap.walk():
            s = snap.records.snapshots[info.name]
            dev = snap.devices.attached(s["volume"]) if snap.devices is not None else None
            rows.append({"key": info.name, "kind": info.kind.label, "parent": info.parent,
                         "volume": s["volume"], "device": dev, "labels": info.labels,
                         "created": info.created_at})
        vols = [{"name": n, "volume": v["volume"], "size": v["size"]}
                for n, v in sorted(snap.records.volumes.items())]
        images = [{"name": n, "top": i["top"], "layers": i["layers"]}
                  for n, i in sorted(snap.records.images.items())]
    if as_json:
        output.emit_json({"snapshots": rows, "volumes": vols, "images": images})
        return
    output.table(None, [("KEY", "left"), ("KIND", "left"), ("PARENT", "left"),
                        ("VOLUME", "left"), ("DEVICE", "left"), ("CREATED", "left")],
                 [(r["key"], r["kind"], r["parent"] or "-", r["volume"], r["device"] or "-",
                   _when(r["created"])) for r in rows])
    from thinpool.units import format_size
    for v in vols:
        output.echo(f"data volume {v['name']}: {v['volume']}, {format_size(v['size'])}")
    for i in images:
        output.echo(f"image {i['name']}: {len(i['layers'])} layer(s), top {i['top']}")


@runtime.command("usage")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("keys", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@pass_session
def runtime_usage(session: Session, target: Target, keys: tuple[str, ...], as_json: bool) -> None:
    """What each snapshot adds to its parent: bytes and blocks (all snapshots, or KEYS)."""
    from thinpool.units import format_size
    with runtime_of(session, target.pool) as snap:
        wanted = list(keys) or [i.name for i in snap.walk()]
        rows = [(k, snap.usage(k)) for k in wanted]
    if as_json:
        output.emit_json([{"key": k, "size": u.size, "blocks": u.blocks, "inodes": u.inodes}
                          for k, u in rows])
        return
    output.table(None, [("KEY", "left"), ("SIZE", "right"), ("BLOCKS", "right")],
                 [(k, format_size(u.size), str(u.blocks)) for k, u in rows])


@runtime.command("cleanup")
@click.argument("target", metavar="POOL", type=POOL)
@pass_session
def runtime_cleanup(session: Session, target: Target) -> None:
    """Delete the runtime's volumes that no snapshot owns; finish deferred removals."""
    with runtime_of(session, target.pool) as snap:
        gone = snap.cleanup()
    output.echo(f"deleted {len(gone)} volume(s)" + (f": {', '.join(gone)}" if gone else ""))


@runtime.command("configure")
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--base-size", type=SIZE, help="Size of a new base filesystem (dm.basesize).")
@click.option("--fs", "fs_type", type=click.Choice(["ext4", "xfs"]), help="Filesystem (dm.fs).")
@click.option("--mkfs-option", "mkfs_options", multiple=True, help="Extra mkfs argument (dm.mkfsarg).")
@click.option("--mount-option", "mount_options", multiple=True, help="Mount option (dm.mountopt).")
@click.option("--min-free-space", type=float,
              help="Refuse new snapshots below this % of free data space (dm.min_free_space).")
@click.option("--deferred-removal/--no-deferred-removal", default=None,
              help="Remove a busy device later instead of failing (dm.use_deferred_removal).")
@click.option("--json", "as_json", is_flag=True)
@pass_session
def runtime_configure(session: Session, target: Target, base_size, fs_type, mkfs_options,
                      mount_options, min_free_space, deferred_removal, as_json: bool) -> None:
    """Show or change the runtime's options for POOL (kept in the pool)."""
    import dataclasses
    changes = {k: v for k, v in (("base_size", base_size), ("fs_type", fs_type),
                                 ("min_free_space", min_free_space),
                                 ("deferred_removal", deferred_removal)) if v is not None}
    if mkfs_options:
        changes["mkfs_options"] = list(mkfs_options)
    if mount_options:
        changes["mount_options"] = list(mount_options)
    with runtime_of(session, target.pool) as snap:
        opts = snap.configure(**changes) if changes else snap.options
    doc = dataclasses.asdict(opts)
    if as_json:
        output.emit_json(doc)
        return
    output.fields(f"runtime options of pool {target.pool}", [(k, str(v)) for k, v in doc.items()])


# -- images ------------------------------------------------------------------------------------
@cli.group()
def image() -> None:
    """Images from layer tars, without containerd."""


@image.command("import")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("name")
@click.argument("layers", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_session
def image_import(session: Session, target: Target, name: str, layers: tuple[Path, ...]) -> None:
    """Unpack layer tars (base first) into committed thin snapshots; image NAME is the last.

    Layers already in the pool (the same chain of layers below) are shared, not unpacked again.
    Whiteouts (.wh.NAME) and opaque directories (.wh..wh..opq) are applied.
    """
    from thinpool.runtime.images import import_image
    argv = ["image", "import", target.pool, name, *[str(p.absolute()) for p in layers]]
    with runtime_of(session, target.pool, argv) as snap:
        results = import_image(snap, name, [Path(p) for p in layers])
    for r in results:
        output.echo(f"{'shared' if r.reused else 'unpacked'} {r.key}")
    output.echo(f"image {name}: {len(results)} layer(s)")


@image.command("delete")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("name")
@click.option("--layers", is_flag=True, help="Also remove the image's layers no one else uses.")
@pass_session
def image_delete(session: Session, target: Target, name: str, layers: bool) -> None:
    """Forget image NAME (its layers stay unless --layers)."""
    with runtime_of(session, target.pool) as snap:
        img = snap.image(name)
        snap.remove_image(name)
        removed = []
        if layers:
            others = {k for i in snap.records.images.values() for k in i["layers"]}
            for key in reversed(img["layers"]):
                if key in others or key not in snap.records.snapshots or snap.records.children(key):
                    break
                snap.remove(key)
                removed.append(key)
    output.echo(f"deleted image {name}" + (f" and {len(removed)} layer(s)" if removed else ""))


# -- containers --------------------------------------------------------------------------------
CONTAINER_PREFIX = "containers/"


@cli.group()
def container() -> None:
    """Containers: writable snapshots of an image, without containerd."""


@container.command("create")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("name")
@click.option("--image", "image_name", required=True)
@pass_session
def container_create(session: Session, target: Target, name: str, image_name: str) -> None:
    """A container NAME: a writable O(1) snapshot of IMAGE's top layer."""
    argv = ["container", "create", target.pool, name, "--image", image_name]
    with runtime_of(session, target.pool, argv) as snap:
        top = snap.image(image_name)["top"]
        snap.prepare(CONTAINER_PREFIX + name, top, labels={"thinpool/image": image_name})
        snap.release(CONTAINER_PREFIX + name)
    output.echo(f"created container {name} from image {image_name}")


def _parse_volume(text: str) -> tuple[str, str]:
    name, sep, where = text.partition(":")
    if not sep or not name or not where.startswith("/"):
        raise click.BadParameter(f"{text!r}: give VOLUME:/PATH", param_hint="--volume")
    return name, where


@container.command("mount")
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--volume", "volumes", multiple=True, metavar="VOL:/PATH",
              help="Mount data volume VOL at PATH inside the container's tree.")
@pass_session
def container_mount(session: Session, target: Target, directory: Path,
                    volumes: tuple[str, ...]) -> None:
    """Mount container NAME's filesystem on DIRECTORY (and data volumes inside it)."""
    from thinpool.runtime.filesystem import mount, unmount
    pairs = [_parse_volume(v) for v in volumes]
    where = directory.absolute()
    argv = ["container", "mount", f"{target.pool}/{target.volume}", str(where),
            *[a for v in volumes for a in ("--volume", v)]]
    with runtime_of(session, target.pool, argv) as snap:
        key = CONTAINER_PREFIX + target.volume
        if not where.is_dir():
            raise InvalidArgument(f"{where} is not a directory")
        m = snap.mounts(key)[0]
        mount(m, where)
        done = [where]
        try:
            for vol, inside in pairs:
                vm = snap.volume_mount(vol)
                sub = where / inside.lstrip("/")
                sub.mkdir(parents=True, exist_ok=True)
                mount(vm, sub)
                done.append(sub)
        except BaseException:
            for d in reversed(done):
                unmount(d)
            for vol, _ in pairs:
                snap.release_volume(vol)
            snap.release(key)
            raise
    output.echo(f"mounted container {target.volume} at {where}")


@container.command("unmount")
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@pass_session
def container_unmount(session: Session, target: Target) -> None:
    """Unmount container NAME (and the data volumes mounted inside it)."""
    from thinpool.runtime.filesystem import mounted_at, unmount
    argv = ["container", "unmount", f"{target.pool}/{target.volume}"]
    with runtime_of(session, target.pool, argv) as snap:
        key = CONTAINER_PREFIX + target.volume
        s = snap.records.snapshots.get(key)
        if s is None:
            from thinpool.errors import NotFound
            raise NotFound(f"container {target.volume!r} does not exist")
        dev = snap.devices.attached(s["volume"]) if snap.devices is not None else None
        roots = mounted_at(dev) if dev else []
        # Data volumes mounted below the container's mount points go first.
        inner = []
        for name, v in snap.records.volumes.items():
            vdev = snap.devices.attached(v["volume"]) if snap.devices is not None else None
            if vdev:
                for mp in mounted_at(vdev):
                    if any(mp.startswith(r.rstrip("/") + "/") for r in roots):
                        inner.append((mp, name))
        for mp, _ in sorted(inner, key=lambda x: x[0].count("/"), reverse=True):
            unmount(mp)
        for name in {n for _, n in inner}:
            snap.release_volume(name)
        for mp in roots:
            unmount(mp)
        snap.release(key)
    output.echo(f"unmounted container {target.volume}")


@container.command("delete")
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@pass_session
def container_delete(session: Session, target: Target) -> None:
    """Delete container NAME (its exclusive blocks go back to the pool; data volumes stay)."""
    argv = ["container", "delete", f"{target.pool}/{target.volume}"]
    with runtime_of(session, target.pool, argv) as snap:
        snap.remove(CONTAINER_PREFIX + target.volume)
    output.echo(f"deleted container {target.volume}")


# -- data volumes ------------------------------------------------------------------------------
@cli.group()
def volume() -> None:
    """Data volumes: named filesystems that outlive containers."""


@volume.command("create")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("name")
@click.option("--size", type=SIZE, required=True)
@pass_session
def volume_create(session: Session, target: Target, name: str, size: int) -> None:
    """A data volume NAME of --size with a fresh filesystem."""
    argv = ["volume", "create", target.pool, name, "--size", str(size)]
    with runtime_of(session, target.pool, argv) as snap:
        snap.create_volume(name, size)
    output.echo(f"created data volume {name}")


@volume.command("delete")
@click.argument("target", metavar="POOL", type=POOL)
@click.argument("name")
@pass_session
def volume_delete(session: Session, target: Target, name: str) -> None:
    """Delete data volume NAME (refused while it is mounted)."""
    argv = ["volume", "delete", target.pool, name]
    with runtime_of(session, target.pool, argv) as snap:
        try:
            snap.remove_volume(name)
        except BusyError as e:
            raise BusyError(f"data volume {name!r} is in use: {e}") from None
    output.echo(f"deleted data volume {name}")
