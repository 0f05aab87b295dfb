"""Field positions in a decoded SQE (the tuple :data:`nvme_emu.queue.SQE` unpacks)."""

OPC, FLAGS, CID, NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10, CDW11, CDW12, CDW13, CDW14, CDW15 = range(15)
