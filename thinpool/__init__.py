"""thinpool: thin-provisioned block device pools in the Linux dm-thin metadata format.

Public API::

    from thinpool import Pool, Volume, ThinpoolError
    pool = Pool.create(path, data_size=10 * 2**30)
    vol = pool.create_thin("vol0", size=100 * 2**30)
    vol.write(0, b"hello"); snap = pool.snapshot("vol0", "snap0"); pool.commit()

The names are imported on first use, so a command that needs only part of the package (the
CLI's metadata tools, say) does not pay for the rest at start-up.
"""

from .errors import ThinpoolError

__all__ = ["Pool", "PoolMode", "PoolStat", "Volume", "ThinpoolError"]


def __getattr__(name: str):
    if name in ("Pool", "PoolMode", "PoolStat"):
        from . import pool
        return getattr(pool, name)
    if name == "Volume":
        from .volume import Volume
        return Volume
    raise AttributeError(f"module 'thinpool' has no attribute {name!r}")
