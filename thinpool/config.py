"""A pool directory's configuration file (pool.json): where the data and metadata live and the
pool's behaviour options. Written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import InvalidArgument, MetadataError, NotFound
from .paths import CONFIG_NAME


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


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:          # lone surrogates: bytes from argv that are not UTF-8
        return False
    return True


def _read_config(path: Path) -> dict:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise NotFound(f"no pool at {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        return cfg
    except (ValueError, OSError) as e:
        raise MetadataError(f"pool configuration {cfg_path} is unreadable: {e}") from None


def pool_files(path) -> tuple[Path, Path]:
    """(metadata path, data path) of the pool in directory ``path``, from its pool.json."""
    path = Path(path)
    cfg = _read_config(path)
    try:
        return path / cfg["metadata"], path / cfg["data"]
    except (KeyError, TypeError) as e:
        raise MetadataError(f"pool configuration {path / CONFIG_NAME} is unreadable: {e}") from None


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
