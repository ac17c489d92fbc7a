"""Making the filesystem of a runtime snapshot's base volume (Docker devicemapper's ``dm.fs``).

:func:`make_filesystem` runs the host's ``mkfs`` for ``ext4`` or ``xfs`` on a block device, with
the options that suit a thin volume: no discard at mkfs time (every block of a new thin volume is
unprovisioned already, so a discard only costs time) and, for ext4, lazy inode-table and journal
initialisation (unprovisioned blocks read as zeros, which is what that initialisation would
write). Extra options from the caller come last. A failed mkfs raises ExportError (the program's
message) and leaves the device as the program left it: the caller throws the volume away.
Programs run through :func:`thinpool.export.loop.run` (the one runner for host programs).
"""

from __future__ import annotations

from thinpool.export import loop

#: fs type -> (mkfs program, its options for a thin volume)
FILESYSTEMS: dict[str, tuple[str, list[str]]] = {
    "ext4": ("mkfs.ext4", ["-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]),
    "xfs": ("mkfs.xfs", ["-q", "-f", "-K"]),
}

MKFS_TIMEOUT = 300.0


def make_filesystem(fs_type: str, device: str, options: list[str] | None = None) -> None:
    program, defaults = FILESYSTEMS[fs_type]
    loop.run([program, *defaults, *(options or []), device], timeout=MKFS_TIMEOUT)


def mount(m, target, extra: list[str] | None = None) -> None:
    """``mount -t TYPE [-o OPTIONS] SOURCE TARGET`` for a :class:`~thinpool.runtime.types.Mount`;
    ExportError (mount's message) when it fails, and then nothing is mounted."""
    opts = [*m.options, *(extra or [])]
    loop.run(["mount", "-t", m.type, *(["-o", ",".join(opts)] if opts else []), m.source,
              str(target)])


def unmount(target, timeout: float = 30.0) -> None:
    """Unmount ``target`` (BusyError while something there is in use: nothing changed)."""
    from thinpool.errors import BusyError, ExportError
    try:
        loop.run(["umount", str(target)], timeout=timeout)
    except ExportError as e:
        if "busy" in (e.stderr or "").lower():
            raise BusyError(f"{target} is in use ({(e.stderr or '').strip()}); close what uses "
                            f"it and try again") from None
        raise


def mounted_at(device: str) -> list[str]:
    """Where ``device`` is mounted now (from /proc/self/mounts), deepest first."""
    import os
    real = os.path.realpath(device)
    found = [m.mountpoint for m in loop.mounts() if m.source == real or m.source == device]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)
