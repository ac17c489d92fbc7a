"""The README's first command, run as written in a fresh virtual environment on a clean copy of
the checkout: it installs the package and runs a short real session with the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The lines of the README's first ``sh`` code block."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("```sh") + 1
    end = lines.index("```", start)
    return lines[start:end]


def test_readme_keeps_its_two_commands():
    first, second = readme_commands()
    assert first.startswith("pip install . && ")
    assert second == "pip install -e '.[test,fuse,runtime]' && python -m pytest -q"


def _checkout_copy(dest: Path) -> None:
    """The working tree's files (tracked and untracked, minus what .gitignore excludes)."""
    if shutil.which("git") and (REPO / ".git").exists():
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                               capture_output=True, check=True).stdout.split(b"\0")
        for raw in names:
            rel = raw.decode()
            src = REPO / rel
            if rel and src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "build", "dist"))


def test_readme_first_command_in_a_fresh_venv(tmp_path):
    first = readme_commands()[0]
    src, venv, home, tmp = (tmp_path / n for n in ("src", "venv", "home", "tmp"))
    for d in (src, home, tmp):
        d.mkdir()
    _checkout_copy(src)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "THINPOOL_HOME", "THINPOOL_DEBUG", "PYTHONHOME",
                        "PIP_REQUIRE_VIRTUALENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               HOME=str(home), TMPDIR=str(tmp), PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run(["bash", "-c", first], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode and "pip install ." in first and (
            "No matching distribution" in r.stderr or "Could not find a version" in r.stderr):
        pytest.skip("no package index reachable to install the dependencies into a fresh venv")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    # It really ran the console script installed in the venv, not this checkout.
    script = venv / "bin" / "thinpool"
    assert script.is_file()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import thinpool.cli; print(thinpool.cli.__file__)"],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where
    for text in ("created pool demo", "created volume demo/vol0", "hello from thinpool",
                 "pool demo", "snap0", "transaction id"):
        assert text in r.stdout, (text, r.stdout)
