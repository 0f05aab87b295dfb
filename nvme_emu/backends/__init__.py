"""The storage behind a namespace, one module per kind.

A :class:`nvme_emu.namespace.Namespace` speaks logical blocks and NVMe statuses; a backend
speaks bytes and errnos (:mod:`.base`). Backend failures become NVMe statuses in
:mod:`.errors`; the views and vectored I/O they share are in :mod:`.iov`. The kinds:

- ``ram`` (:mod:`.ram`): process memory;
- ``file`` (:mod:`.file`) and ``blk`` (:mod:`.block`): a regular file or a block device, by
  ``preadv``/``pwritev`` on a file descriptor (:mod:`.fd`).
"""
