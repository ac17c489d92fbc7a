"""File names inside a pool directory (kept apart so light callers need not import the pool)."""

import os

CONFIG_NAME = "pool.json"     # what makes a directory a pool: where its data and metadata are
NAMES_NAME = "names.json"     # the names registry
#: The second copy of each record (see records.py): losing or damaging one file loses nothing.
CONFIG_COPY_NAME = "pool.copy.json"
NAMES_COPY_NAME = "names.copy.json"
#: Left by a command that found damage but could not write NEEDS_CHECK itself (see damage.py).
MARKER_NAME = "needs-check.json"

_COPIES = {CONFIG_NAME: CONFIG_COPY_NAME, NAMES_NAME: NAMES_COPY_NAME}


def copy_of(path) -> str:
    """The second copy's path of record ``path`` (``pool.json`` -> ``pool.copy.json``)."""
    d, name = os.path.split(os.fspath(path))
    stem, dot, ext = name.rpartition(".")
    return os.path.join(d, _COPIES.get(name) or (f"{stem}.copy.{ext}" if dot else f"{name}.copy"))


def is_pool_dir(path) -> bool:
    """True when ``path`` holds a pool: either copy of its pool.json is there (or, when both
    are lost, a copy of its names)."""
    return any(os.path.isfile(os.path.join(path, n))
               for n in (CONFIG_NAME, CONFIG_COPY_NAME, NAMES_NAME, NAMES_COPY_NAME))
