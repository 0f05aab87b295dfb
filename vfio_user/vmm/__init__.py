"""The VMM side of vfio-user: what QEMU does, in Python, for tests and benchmarks.

Nothing here is used by the servers. :mod:`.client` is a blocking vfio-user client that
behaves like QEMU's (it reuses :mod:`vfio_user.messages` and the sans-IO
:mod:`vfio_user.protocol`, and :mod:`vfio_user.unix` for the socket calls); :mod:`.kvm` is a
minimal KVM VMM (ioctls on ``/dev/kvm``, memfd guest RAM, ioeventfds with POST_WRITE or its
emulation); :mod:`.x86` assembles the tiny guest programs it runs. None of it knows NVMe: the
NVMe driver loops written as guest programs are in :mod:`nvme_emu.guest_programs`.
"""
