"""The VMM side of vfio-user: what QEMU does, in Python, for tests and benchmarks.

Nothing here is used by the servers. :mod:`.client` is a blocking vfio-user client that
behaves like QEMU's (it reuses :mod:`vfio_user.messages` and the sans-IO
:mod:`vfio_user.protocol`, and :mod:`vfio_user.unix` for the socket calls); :mod:`.kvm` is a
minimal KVM VMM (ioctls on ``/dev/kvm``, memfd guest RAM from :mod:`.memory`, ioeventfds with
POST_WRITE, or its emulation in :mod:`.post_write`); :mod:`.x86` assembles the tiny guest
programs it runs. The imports run one way: :mod:`.memory` below :mod:`.kvm`, :mod:`.x86`
above both, :mod:`.post_write` on top. None of it knows NVMe: the NVMe driver loops written
as guest programs are in :mod:`nvme_emu.testing.guest_programs`.
"""
