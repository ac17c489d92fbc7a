"""A pool directory's configuration file (pool.json): where the data and metadata live and the
pool's behaviour options. Kept in two copies, pool.json and pool.copy.json, each written
atomically (temp file, fsync, rename; see records.py): one damaged or lost file loses nothing (the
other is used and the damaged one rewritten by the next writer's open). When no copy is intact,
opening the pool raises PoolDamaged naming the files and what to write back.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from . import records
from .errors import InvalidArgument, NotFound, PoolDamaged
from .paths import CONFIG_COPY_NAME, CONFIG_NAME, is_pool_dir


@dataclass
class PoolOptions:
    """Behaviour settings kept in pool.json (dm-thin's pool table arguments and dmeventd's
    low-water handling)."""

    error_if_no_space: bool = False     # fail a write at once when no data block is free
    no_space_timeout: float = 60.0      # otherwise wait this long for space (seconds; 0 = fail)
    low_water_blocks: int = 0           # run the hook once when free data blocks fall below
    low_water_hook: str | None = None   # a shell command; gets THINPOOL_POOL, THINPOOL_FREE_BLOCKS

    @classmethod
    def from_dict(cls, d: dict | None) -> "PoolOptions":
        d = d or {}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> "PoolOptions":
        if not isinstance(self.no_space_timeout, (int, float)) or self.no_space_timeout < 0:
            raise InvalidArgument(f"no-space timeout {self.no_space_timeout!r} must be 0 or more seconds")
        if not isinstance(self.low_water_blocks, int) or self.low_water_blocks < 0:
            raise InvalidArgument(f"low-water mark {self.low_water_blocks!r} must be 0 or more blocks")
        hook = self.low_water_hook
        if hook is not None and (not isinstance(hook, str) or "\0" in hook or not _utf8(hook)):
            raise InvalidArgument(f"low-water hook {hook!r} must be UTF-8 text without NUL")
        return self


def _check_config(cfg: dict) -> None:
    for key in ("data", "metadata"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise ValueError(f"its {key!r} entry is not a path")
    if not isinstance(cfg.get("options", {}), dict):
        raise ValueError("its 'options' entry is not an object")


def read_config(path) -> records.Read:
    """Both copies of the pool's configuration (see records.py): NotFound when neither file is
    there, PoolDamaged when no copy is intact."""
    path = Path(path)
    got = records.read(path / CONFIG_NAME, _check_config)
    if got.doc is None:
        if all(p.what == "missing" for p in got.problems) and not is_pool_dir(path):
            raise NotFound(f"no pool at {path}")
        raise PoolDamaged(
            f"the pool configuration is lost: {'; '.join(map(str, got.problems))}. It says where "
            f"the data and metadata are; if they are the files 'data' and 'metadata' in {path}, "
            f"write {{\"data\": \"data\", \"metadata\": \"metadata\"}} into {path / CONFIG_NAME} "
            f"(see the README, 'Damaged pool records'), then run 'thinpool check {path.name}'",
            str(path / CONFIG_NAME))
    return got


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:          # lone surrogates: bytes from argv that are not UTF-8
        return False
    return True


def _read_config(path: Path) -> dict:
    return read_config(path).doc


def pool_files(path) -> tuple[Path, Path]:
    """(metadata path, data path) of the pool in directory ``path``, from its pool.json."""
    path = Path(path)
    cfg = _read_config(path)
    return path / cfg["metadata"], path / cfg["data"]


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())


def _write_json(path: Path, doc: dict) -> None:
    """Write a record and its copy atomically (records.write)."""
    records.write(path, doc)


def settle_config(path, conf: records.Read, write: bool) -> list[str]:
    """After an open: notes on a damaged or missing copy of pool.json and, for a writer
    (``write``), both copies rewritten from the one in use (a damaged file moved aside first;
    a pool.json from an older version gets its copy). A failure to rewrite is a note: the copy
    in use is intact."""
    path = Path(path)
    doc = {k: v for k, v in conf.doc.items() if k != "copies"}
    if not conf.problems and not conf.differs:
        if conf.legacy and write:
            try:
                _write_json(path / CONFIG_NAME, doc)
            except OSError as e:
                return [(f"pool configuration: {CONFIG_COPY_NAME} could not be added "
                         f"({e.strerror or e})")]
        return []
    what = "; ".join(map(str, conf.problems)) or f"{CONFIG_COPY_NAME} differs from {CONFIG_NAME}"
    if not write:
        return [(f"pool configuration: {what}; read from {conf.source}; the next command that "
                 f"writes to the pool rewrites it")]
    try:
        kept = records.preserve(conf.problems)
        _write_json(path / CONFIG_NAME, doc)
    except OSError as e:
        return [(f"pool configuration: {what}; read from {conf.source}; rewriting it failed "
                 f"({e.strerror or e})")]
    return [f"pool configuration: {what}; rewrote both copies from {conf.source}"
            + "".join(f"; {k}" for k in kept)]
