"""The control plane's ns_add takes the same spec string, metadata keys and all."""

from __future__ import annotations

import pytest

from nvme_emu.control import ControlPlane
from nvme_emu.controller import ControllerConfig
from nvme_emu.function import NvmeFunction
from nvme_emu.namespace_spec import open_namespace

from .helpers import ns_view


def test_ns_add_with_metadata_and_pi(tmp_path):
    function = NvmeFunction([open_namespace("ram:size=1M", 1)], ControllerConfig(serial="NVMEEMU00000026"), doorbell="trap")
    try:
        ctl = ControlPlane(function)
        added = ctl.ns_add(f"file:{tmp_path / 'pi.img'},size=1M,lba=4096,ms=16,pi=1,guard=64")
        assert (added["nsid"], added["ms"], added["pi"], added["guard"], added["pil"]) == (2, 16, 1, 64, "last")
        assert added["meta_path"] == str(tmp_path / "pi.img.meta")
        v = ns_view(function.controller.state, 2)
        assert (v.lbaf, v.ms, v.pi_type, v.pif) == (6, 16, 1, 0b10)
        with pytest.raises(ValueError, match="protection information lives in metadata"):
            ctl.ns_add("ram:size=1M,pi=1")
        assert sorted(function.controller.state.namespaces) == [1, 2]
    finally:
        function.close()
