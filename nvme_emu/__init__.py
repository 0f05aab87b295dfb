"""An NVMe controller emulator served over vfio-user; knows nothing of sockets."""

__version__ = "0.1.0"
