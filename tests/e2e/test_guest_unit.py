"""Fast checks of nvme_emu.guest helpers (no QEMU)."""

import json

from nvme_emu import guest


def test_newc_cpio_layout():
    data = guest.make_cpio({"job/run.sh": b"echo hi\n"}, dirs=["job"])
    assert len(data) % 512 == 0
    assert data.startswith(b"070701")
    assert b"job/run.sh\0" in data and b"echo hi\n" in data
    assert b"TRAILER!!!\0" in data
    # every header starts 4-byte aligned
    pos = 0
    names = []
    while True:
        hdr = data[pos:pos + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        names.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
    assert names == ["job", "job/run.sh", "TRAILER!!!"]


def test_parse_console():
    fio = {"jobs": [{"jobname": "x", "error": 0}]}
    console = (
        "SeaBIOS\r\n=====NVME-EMU-BEGIN=====\r\nline\r\n"
        f"{guest.FIO_BEGIN}\r\nfio: warning\r\n{json.dumps(fio)}\r\n{guest.FIO_END}\r\n"
        "=====NVME-EMU-END rc=3=====\r\n[ 1.0] reboot: Power down\r\n"
    )
    rc, out, parsed = guest.parse_console(console)
    assert rc == 3
    assert out.startswith("line\n")
    assert parsed == fio
    assert guest.parse_console("no markers") == (None, "", None)


def test_load_args_fills_placeholders():
    args = guest.load_args(
        "vfio-user-nvme.args",
        {"MEM": "512M", "CPUS": "1", "KERNEL": "/k", "INITRD": "/i",
         "KERNEL_ARGS": "", "SOCKET": "/tmp/s.sock"},
        "tcg",
    )
    assert "-accel" in args and "tcg,thread=multi" in args
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in args
    dev = json.loads(args[args.index("-device") + 1])
    assert dev["driver"] == "vfio-user-pci"
    assert dev["socket"] == {"type": "unix", "path": "/tmp/s.sock"}


def test_extra_sockets_add_one_device_each_like_the_first():
    args = guest.build_cmdline(socket_path="/tmp/a.sock", builtin_image=None, kernel="/k", initrd="/i", cpus=1,
                               memory_mb=512, accel="tcg", extra_sockets=["/tmp/b.sock"])
    devices = [json.loads(args[i + 1]) for i, w in enumerate(args) if w == "-device"]
    assert [d["socket"]["path"] for d in devices] == ["/tmp/a.sock", "/tmp/b.sock"]
    assert devices[0] == {**devices[1], "socket": devices[0]["socket"]}  # same options for both
