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
