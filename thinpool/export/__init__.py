"""Exports: a pool's volumes made available to other programs (layer 6).

* :mod:`.nbd_wire`  the NBD protocol's constants and struct layouts
* :mod:`.nbd`       the NBD server (:class:`~thinpool.export.nbd.NBDServer`): sockets, threads, commits
* :mod:`.nbd_conn`  one client connection: handshake and transmission
* :mod:`.state`     the files a running daemon keeps in the pool directory, the control client
* :mod:`.daemon`    ``thinpool serve``'s process: the pool held open for writing, the NBD server,
                    a control socket, the state file ``exports.json``
* :mod:`.images`    disk images (qcow2, vmdk, vdi) into and out of volumes through qemu-img and
                    an in-process NBD server
* ``fuse``          a volume as a file and a loop device (written separately; optional)
"""
