"""The host side of nvme-emu's tests and benchmarks; nothing the server runs imports it.

* :mod:`.host`: a minimal NVMe host driver (:class:`~nvme_emu.testing.host.NvmeHost`) that
  plays the guest's Linux driver over any bus with ``region_read``/``region_write``;
* :mod:`.guest_programs`: its QD1 loop as a tiny guest program for the Python KVM VMM
  (:mod:`vfio_user.vmm`).

They live apart from the device so that the package's runtime (``nvme-emu serve``) and its
harness cannot lean on each other by accident: the harness imports the device's layouts
(:mod:`nvme_emu.spec`, :mod:`nvme_emu.sqe`, :mod:`nvme_emu.queue`), never the reverse.
"""
