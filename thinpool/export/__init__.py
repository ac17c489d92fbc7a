"""Exports: ways for other programs to use a pool's volumes (L6, see DESIGN.md).

``fuse`` (a volume as one file through FUSE, with a loop device over it; needs the ``fuse``
extra: ``pip install 'thinpool[fuse]'``) and ``loop`` (the host's loop devices and mount
table). Nothing is imported here, so each export's optional dependencies stay optional.
"""
