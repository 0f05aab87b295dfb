"""vfio-user, server and client side, in pure Python; knows nothing of NVMe."""
