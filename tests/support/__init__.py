"""What the suites and the benchmarks share: one implementation of each harness piece.

* :mod:`.server`: a server under test as a separate process (``nvme-emu serve`` on either
  backend, the sample device, ``serve_device.py``): readiness, fds, mappings, log waits, stats;
* :mod:`.inproc`: the real server on a loop in a thread of this process;
* :mod:`.host`: the host side, a client + guest RAM + :class:`~nvme_emu.testing.host.NvmeHost` with
  completions by command ID, and the PRP builder;
* :mod:`.fds`: eventfd helpers.

Test modules import it relatively (``from ..support.host import Host``: pytest runs with
``--import-mode=importlib`` and ``tests`` is a package); the benchmarks as ``tests.support``.
"""
