"""Exports: a pool's volumes made available to other programs (layer 6).

* :mod:`.nbd_wire`  the NBD protocol's constants and struct layouts
* :mod:`.nbd`       the NBD server (:class:`~thinpool.export.nbd.NBDServer`): sockets, threads, commits
* :mod:`.nbd_conn`  one client connection: handshake and transmission
* :mod:`.state`     the files a running daemon keeps in the pool directory, the control client
* :mod:`.daemon`    ``thinpool serve``'s process: the pool held open for writing, the NBD server,
                    a control socket, the state file ``exports.json``
* :mod:`.images`    disk images (qcow2, vmdk, vdi) into and out of volumes through qemu-img and
                    an in-process NBD server
* :mod:`.fuse`      a volume as a block device: :func:`~thinpool.export.fuse.attach` mounts its FUSE
                    file (:mod:`.fuse_file`) and binds a loop device to it; needs the ``fuse``
                    extra (mfusepy), so nothing here imports it
* :mod:`.loop`      the host's side: losetup, the mount table, umount (every OS call the FUSE
                    export makes)
"""
