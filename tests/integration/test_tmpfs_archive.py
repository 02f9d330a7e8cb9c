"""migrt's CRIU writes a small tmpfs (runc's /dev) as tar would, without running tar
(packaging/criu-patches/tmpfs-small-archive-without-tar.patch), and extracts such an
image itself. Any CRIU's tar must still read the image, and a tampered one must not
write anything outside the mount it is restored into.

Plain runc and the node's CRIU (migrt.runc.criu_path), on a busybox container."""
import glob
import io
import os
import subprocess
import tarfile
import tempfile
import zlib

import pytest

import ocitest
from migrt.runc import criu_path

# the gzip header the patch writes: deflate, FEXTRA, subfield "Mg" holding "mgt1"
HEAD = bytes([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0x03,
              8, 0, ord("M"), ord("g"), 4, 0]) + b"mgt1"


def _env():
    return dict(os.environ, PATH=os.path.dirname(criu_path()) + ":" + os.environ["PATH"])


def _runc(root, *args, check=True):
    """runc's exit status and output. Into a file, not a pipe: a container started or
    restored with -d keeps runc's stdout and stderr as its own."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.run(["runc", "--root", root, *args], stdout=out, stderr=err,
                           env=_env(), stdin=subprocess.DEVNULL, timeout=120)
        out.seek(0)
        err.seek(0)
        p.stdout, p.stderr = out.read().decode(errors="replace"), err.read().decode(
            errors="replace")
    assert not check or p.returncode == 0, (args, p.stderr)
    return p


def _wrap(tar_bytes):
    """tar_bytes as the patch's image: its gzip header, stored deflate blocks, CRC, size."""
    c = zlib.compressobj(0, zlib.DEFLATED, -15)
    body = c.compress(tar_bytes) + c.flush()
    return (HEAD + body + zlib.crc32(tar_bytes).to_bytes(4, "little")
            + (len(tar_bytes) & 0xffffffff).to_bytes(4, "little"))


def _tar(*entries):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = kind, 0o644
            if kind == tarfile.SYMTYPE:
                ti.linkname = data
                t.addfile(ti)
            elif kind == tarfile.DIRTYPE:
                ti.mode = 0o755
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def checkpointed(tmp_path, make_bundle):
    """A busybox container checkpointed by plain runc: (root, bundle, image dir, /dev's
    image, cid)."""
    root = str(tmp_path / "root")
    cid = ocitest.uid("ta")
    bundle = make_bundle(["sh", "-c", ocitest.COUNTER], name=cid)
    rt = ocitest.Runtime("runc", root, env={"PATH": _env()["PATH"]})
    code, out, err = rt.create(cid, bundle, start=True)     # stdio: pipes CRIU can dump
    assert code == 0, err.text
    try:
        # /dev with more than runc puts there: a directory tree, a setuid file, a FIFO, a link
        _runc(root, "exec", cid, "sh", "-c",
              "mkdir -p /dev/tree/deep && echo hello > /dev/tree/file && chmod 4710 /dev/tree/file"
              " && mkfifo /dev/tree/fifo && ln -s ../null /dev/tree/lnk"
              " && touch -d 2001-02-03 /dev/tree/deep")
        look = ("ls -lan --full-time /dev /dev/tree /dev/tree/deep | grep -v ' \\.\\.$'"
                " | grep -v -e ' pts$' -e ' shm$' -e ' mqueue$'")
        before = _runc(root, "exec", cid, "sh", "-c", look).stdout
        img, work = str(tmp_path / "img"), str(tmp_path / "work")
        _runc(root, "checkpoint", "--image-path", img, "--work-path", work, cid)
        log = open(os.path.join(work, "dump.log"), errors="replace").read()
        assert "tmpfs ./dev: " in log and "saved without tar" in log, log[-2000:]
        dev = [p for p in glob.glob(os.path.join(img, "tmpfs-dev-*.tar.gz.img"))
               if open(p, "rb").read(len(HEAD)) == HEAD]
        assert len(dev) >= 1, os.listdir(img)
        yield root, bundle, img, dev, cid, before, look
    finally:        # also when the checkpoint failed: no container left running
        _runc(root, "delete", "--force", cid, check=False)


def test_small_tmpfs_image_is_tar_and_comes_back_as_it_was(tmp_path, checkpointed):
    root, bundle, img, dev, cid, before, look = checkpointed
    # GNU tar reads it (what an unpatched CRIU runs on it)
    listed = "\n".join(subprocess.run(["tar", "-tvzf", p], capture_output=True, text=True,
                                      check=True).stdout for p in dev)
    assert "./null" in listed and "1,3" in listed and "./tree/deep/" in listed, listed
    assert "-rws--x---" in listed and "./tree/lnk -> ../null" in listed, listed
    # this CRIU extracts it itself, to the same tree
    work = str(tmp_path / "work-r")
    _runc(root, "restore", "-d", "--image-path", img, "--work-path", work, "--bundle", bundle,
          cid)
    log = open(os.path.join(work, "restore.log"), errors="replace").read()
    assert "extracted without tar" in log, log[-2000:]
    after = _runc(root, "exec", cid, "sh", "-c", look).stdout
    assert after == before
    assert "2001-02-03" in after and "prw-r--r--" in after


TAMPERED = {
    "a name with ..": lambda esc: _tar(("./", tarfile.DIRTYPE, b""),
                                        ("./../../../../../../../../.." + esc,
                                         tarfile.REGTYPE, b"escaped")),
    "a path through a symlink": lambda esc: _tar(("./", tarfile.DIRTYPE, b""),
                                                  ("./d", tarfile.SYMTYPE,
                                                   os.path.dirname(esc)),
                                                  ("./d/" + os.path.basename(esc),
                                                   tarfile.REGTYPE, b"escaped")),
    "a wrong CRC": None,
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_tampered_small_tmpfs_image_is_refused_and_writes_nothing_outside(
        tmp_path, checkpointed, how):
    root, bundle, img, dev, cid, before, look = checkpointed
    escape = f"/tmp/{ocitest.uid('mgt-esc')}"       # short: a ustar name holds 99 bytes
    if TAMPERED[how] is None:
        data = bytearray(open(dev[0], "rb").read())
        data[len(HEAD) + 5 + 100] ^= 0x01           # a byte of the first tar header
        data = bytes(data)
    else:
        data = _wrap(TAMPERED[how](escape))
    for p in dev:
        with open(p, "wb") as f:
            f.write(data)
    work = str(tmp_path / "work-r")
    p = _runc(root, "restore", "-d", "--image-path", img, "--work-path", work, "--bundle",
              bundle, cid, check=False)
    assert p.returncode != 0, "a tampered tmpfs image was restored"
    log = open(os.path.join(work, "restore.log"), errors="replace").read()
    assert "is not a valid archive" in log, log[-2000:]
    assert not os.path.exists(escape)
