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


def test_builtin_null_is_hw_nvme_on_a_null_co_node_of_that_size():
    args = guest.build_cmdline(socket_path=None, builtin_image=None, builtin_null=1 << 30, kernel="/k", initrd="/i", cpus=1,
                               memory_mb=512, accel="tcg")
    assert args[args.index("-blockdev") + 1] == "driver=null-co,node-name=nvm0,size=1073741824,read-zeroes=on"
    assert args[args.index("-device") + 1] == "nvme,serial=NVMEEMU-NULL,drive=nvm0"
    assert "-drive" not in args


def test_kill_when_pulls_the_plug_at_a_console_marker():
    """boot() SIGKILLs the whole process group ``delay`` s after the marker line (a shell and
    its child stand in for QEMU: boot() only reads the console), and not before it."""
    import signal
    import time

    script = "echo =====NVME-EMU-BEGIN=====; echo before; sleep 0.3; echo cut-here; sleep 60 & wait"
    t0 = time.monotonic()
    res = guest.boot(["sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, accel="tcg", timeout=30,
                     kill_when=guest.KillWhen("cut-here", 0.5))
    assert time.monotonic() - t0 < 10
    assert res.killed_at is not None and 0.75 <= res.killed_at < 5, res.killed_at
    assert res.qemu_returncode == -signal.SIGKILL and res.returncode is None and not res.timed_out
    assert "before" in res.output and "cut-here" in res.output


def test_kill_when_leaves_a_guest_that_finished_first_alone():
    res = guest.boot(["sh", "-c", "echo =====NVME-EMU-BEGIN=====; echo cut-here; echo =====NVME-EMU-END rc=0====="],
                     env={"PATH": "/usr/bin:/bin"}, accel="tcg", timeout=30, kill_when=guest.KillWhen("cut-here", 2.0))
    assert res.returncode == 0 and res.qemu_returncode == 0 and res.killed_at is None


def test_nested_disks_are_virtio_blk_in_order():
    from nvme_emu import nested

    args = nested._disk_args(["/tmp/a,b.img", "/srv/c.img"], chroot="/chroot")
    assert args == ["-drive", "file=/tmp/a,,b.img,format=raw,if=none,id=disk0",
                    "-device", "virtio-blk-pci,drive=disk0,serial=nvme-emu-disk0",
                    "-drive", "file=/host-root/srv/c.img,format=raw,if=none,id=disk1",
                    "-device", "virtio-blk-pci,drive=disk1,serial=nvme-emu-disk1"]
    assert nested._disk_args(["/srv/c.img"], chroot=None)[1].startswith("file=/srv/c.img,")


def test_builtin_zoned_is_a_zoned_nvme_ns_on_the_image():
    z = guest.parse_zoned("zone_size=4M,zone_capacity=3M,max_open=8,max_active=10,lba_size=512")
    assert z == guest.ZonedNamespace(zone_size=4 << 20, zone_capacity=3 << 20, max_open=8, max_active=10, lba_size=512)
    args = guest.build_cmdline(socket_path=None, builtin_image="/tmp/z.raw", builtin_zoned=z, kernel="/k", initrd="/i",
                               cpus=1, memory_mb=512, accel="tcg")
    devices = [args[i + 1] for i, w in enumerate(args) if w == "-device"]
    assert devices[0] == "nvme,id=nvme0,serial=NVMEEMU-ZONED,zoned.zasl=0"
    ns = dict(p.split("=", 1) for p in devices[1].split(",")[1:])
    assert devices[1].startswith("nvme-ns,")
    assert ns["bus"] == "nvme0" and ns["drive"] == "nvm0" and ns["zoned"] == "on"
    assert ns["zoned.zone_size"] == str(4 << 20) and ns["zoned.zone_capacity"] == str(3 << 20)
    assert ns["zoned.max_open"] == "8" and ns["zoned.max_active"] == "10" and ns["logical_block_size"] == "512"
    assert "file=/tmp/z.raw,if=none,id=nvm0,format=raw,discard=unmap" in args


def test_rich_tree_is_exported_read_only_over_9p_for_every_device():
    for kw in ({"socket_path": "/tmp/a.sock", "builtin_image": None}, {"socket_path": None, "builtin_image": "/tmp/d.raw"}):
        args = guest.build_cmdline(**kw, kernel="/k", initrd="/i", cpus=1, memory_mb=512, accel="tcg", rich_tree="/c/rich-root")
        virtfs = args[args.index("-virtfs") + 1].split(",")
        assert virtfs[0] == "local" and "path=/c/rich-root" in virtfs and "readonly=on" in virtfs
        assert f"mount_tag={guest.RICH_ROOT_TAG}" in virtfs


def test_rich_job_hands_the_script_to_the_second_stage():
    files = guest._job_files("echo $BASH_VERSION", None, rich_root=True)
    assert files["job/run.sh"] == b"#!/bin/sh\nexec sh /usr/lib/nvme-emu/rich-root.sh /job/inner.sh\n"
    assert b"bash /job/cmd.sh" in files["job/inner.sh"]
    assert b"sh /job/cmd.sh" in guest._job_files("true", None)["job/run.sh"]


def test_builtin_pi_carves_the_image_into_namespaces_with_metadata():
    """Each ProtectedNamespace is a raw node at its offset in the one image (packed in order)
    and an nvme-ns with its nsid and QEMU's ms/mset/pi/pil/pif; the controller has no
    namespace of its own."""
    nss = [guest.ProtectedNamespace(64 << 20), guest.ProtectedNamespace(32 << 20, pi=3, pil=1),
           guest.ProtectedNamespace(16 << 20, ms=16, pif=2, mset=1)]
    args = guest.build_cmdline(socket_path=None, builtin_image="/tmp/p.raw", builtin_pi=nss, kernel="/k", initrd="/i",
                               cpus=1, memory_mb=512, accel="tcg")
    devices = [args[i + 1] for i, w in enumerate(args) if w == "-device"]
    nodes = [dict(p.split("=", 1) for p in args[i + 1].split(",")) for i, w in enumerate(args) if w == "-blockdev"]
    assert devices[0] == "nvme,id=nvme0,serial=NVMEEMU-PI" and "-drive" not in args
    assert nodes[0] == {"driver": "file", "filename": "/tmp/p.raw", "node-name": "img", "discard": "unmap"}
    assert [(n["file"], int(n["offset"]), int(n["size"])) for n in nodes[1:]] == [
        ("img", 0, 64 << 20), ("img", 64 << 20, 32 << 20), ("img", 96 << 20, 16 << 20)]
    props = [dict(p.split("=", 1) for p in d.split(",")[1:]) for d in devices[1:]]
    assert [d.split(",")[0] for d in devices[1:]] == ["nvme-ns"] * 3
    assert [(p["nsid"], p["drive"], p["bus"]) for p in props] == [("1", "pi1", "nvme0"), ("2", "pi2", "nvme0"),
                                                                  ("3", "pi3", "nvme0")]
    want = [("8", "0", "1", "0", "0"), ("8", "0", "3", "1", "0"), ("16", "1", "1", "0", "2")]
    assert [(p["ms"], p["mset"], p["pi"], p["pil"], p["pif"]) for p in props] == want
    assert all(p["logical_block_size"] == "512" and p["share-rw"] == "on" for p in props)
    odd = guest.pi_namespace_args("/tmp/a,b.raw", nss[:1])
    assert odd[1] == "driver=file,filename=/tmp/a,,b.raw,node-name=img,discard=unmap"


def test_builtin_pi_needs_an_image_and_no_zones():
    import pytest

    with pytest.raises(ValueError):
        guest.run_guest(builtin_null=1 << 30, builtin_pi=[guest.ProtectedNamespace(1 << 20)], command="true")
    with pytest.raises(ValueError):
        guest.run_guest(builtin_image="/tmp", builtin_pi=[guest.ProtectedNamespace(1 << 20)],
                        builtin_zoned=guest.ZonedNamespace(), command="true")
