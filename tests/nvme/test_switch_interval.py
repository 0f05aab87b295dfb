"""``serve --switch-interval-us``: the server process runs with that GIL switch interval (its
stats JSON and start-up line say which), and without the option with Python's own."""

from __future__ import annotations

import sys

import pytest

from nvme_emu.cli import make_parser

from ..support.server import ServerProcess


@pytest.mark.parametrize("extra, expect_us", [((), sys.getswitchinterval() * 1e6), (("--switch-interval-us", "100"), 100.0)])
def test_switch_interval_is_applied_to_the_server_process(tmp_path, extra, expect_us):
    srv = ServerProcess.serve(str(tmp_path / "nvme.sock"), tmp_path / "server.log", extra=extra)
    try:
        assert srv.stats()["process"]["switch_interval_us"] == pytest.approx(expect_us)
        assert f"GIL switch interval {expect_us:g} us" in srv.log()
    finally:
        srv.stop_clean()


@pytest.mark.parametrize("bad", ["0", "-5", "1e7", "fast"])
def test_switch_interval_out_of_range_is_refused(bad, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--switch-interval-us", bad])
    assert "--switch-interval-us" in capsys.readouterr().err
