"""Fixtures of the real-kernel tests (``vm.py``).

``kernel_vm`` (session): a prepared :class:`~tests.kernel.vm.KernelVM` (kernel, modules and
initramfs in the machine's cache, made on first use: a 27 MB download and about 10 s). Skipped,
naming what is missing, when not root, without ``qemu-system-x86_64`` / ``qboot.rom`` (Debian:
qemu-system-x86), a static busybox (busybox-static) or ``dmsetup``, or when the kernel package
cannot be downloaded. Nothing to tear down: each ``run`` boots its own VM and kills and reaps it
by pid, and removes its temporary directory, in ``finally``.
"""

from __future__ import annotations

import pytest

from tests.kernel.vm import KernelVM, Missing, skip_reason


@pytest.fixture(scope="session")
def kernel_vm() -> KernelVM:
    reason = skip_reason()
    if reason:
        pytest.skip(f"kernel VM: {reason}")
    try:
        return KernelVM().prepare()
    except Missing as e:
        pytest.skip(f"kernel VM: {e}")
