"""thinpool: thin-provisioned block device pools in the Linux dm-thin metadata format.

Public API::

    from thinpool import Pool, Volume, ThinpoolError
    pool = Pool.create(path, data_size=10 * 2**30)
    vol = pool.create_thin("vol0", size=100 * 2**30)
    vol.write(0, b"hello"); snap = pool.snapshot("vol0", "snap0"); pool.commit()
"""

from .errors import ThinpoolError
from .pool import Pool, PoolMode, PoolStat
from .volume import Volume

__all__ = ["Pool", "PoolMode", "PoolStat", "Volume", "ThinpoolError"]
