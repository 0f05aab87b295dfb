"""End-to-end data protection (NVM Command Set, "End-to-end Data Protection"): protection
information that travels with each logical block in its metadata, and what checks it.

:mod:`nvme_emu.pi.crc` holds the guard CRCs (CRC-16/T10-DIF for the 16b Guard format,
CRC-64/NVME for the 64b Guard format), computed in C a whole I/O's blocks per call, because a
per-block Python loop over 512-byte blocks would cost more than the rest of the I/O.
:mod:`nvme_emu.pi.format` holds the PI layouts and the command fields, and
:mod:`nvme_emu.pi.engine` inserts, checks and strips PI over an I/O's blocks (sans-IO: it is
given buffers and a :class:`~nvme_emu.pi.format.Guards`, and does no I/O).
"""
