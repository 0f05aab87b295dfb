"""A second server backend: nutanix/libvfio-user, loaded at run time through cffi (ABI mode).

:class:`~vfio_user.libvfio.server.LibvfioUserServer` serves the same
:class:`~vfio_user.device.Device` as :class:`vfio_user.server.Server` and offers the same
surface (:class:`~vfio_user.server_api.VfioUserServer`, and ``client``,
``on_connect``/``on_disconnect``), so a device runs unchanged on either backend. The library
does the wire protocol; this package translates the device API into libvfio-user calls and
runs the context from the asyncio loop through its poll fd. Its modules: :mod:`.library` (the
cffi declarations, finding and loading the library), :mod:`.glue` (setting a context up from
the device, the library's callbacks), :mod:`.screen` (what is refused before the library sees
it) and :mod:`.server` (the server object: listening, the worker thread, feeding the library
whole requests). What the device gets:

* config space: region 7 is registered with ``VFU_REGION_FLAG_ALWAYS_CB``, so every access
  reaches our :class:`~vfio_user.pci.PciConfigSpace` (masks, hooks, FLR) and libvfio-user's
  own copy is never used;
* BARs/ROM: ``vfu_setup_region`` with a callback per region (``Region.do_read/do_write``)
  and the region's sparse mmap areas backed by its memfd;
* DMA: register/unregister callbacks keep a :class:`~vfio_user.dma.DmaTable`, so the device
  gets the usual :class:`~vfio_user.dma.GuestMemory`. Each fd-backed region is re-mapped
  (``mremap(old, 0, ...)`` makes a second mapping of the same shared pages) and that mapping
  is unmapped only when the last view of it is gone, so a device that keeps a view past
  ``dma_unmapping`` reads stale memory instead of crashing the process. Regions without an
  fd go through ``vfu_addr_to_sgl`` + ``vfu_sgl_read/write`` (DMA_READ/DMA_WRITE messages);
* interrupts: a small adapter with the :class:`~vfio_user.irq.IrqState` methods devices use,
  firing through ``vfu_irq_trigger``;
* ioeventfds: ``vfu_create_ioeventfd`` per ``Region.ioeventfds`` entry, shadow ones included
  when the library was built with ``-Dshadow-ioeventfd=true``;
* reset: ``vfu_setup_device_reset_cb`` -> ``config.reset_registers()`` + ``device.reset``.

libvfio-user has no callback for SET_IRQS (which index the client enabled) nor for
GET_REGION_IO_FDS; the server peeks at each request (``recvmsg(MSG_PEEK)``: the header, the
first payload bytes, copies of its fds, closed at once) before ``vfu_run_ctx`` processes it,
to keep ``active_index()`` and ``Device.ioeventfds_taken`` working, and to refuse itself what
the library would take unchecked (:func:`.screen.screen`). Where the library's wire behaviour
differs from the Python backend, see docs/libvfio-user.md and tests/libvfio/.
"""
