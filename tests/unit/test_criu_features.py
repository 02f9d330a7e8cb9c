"""migrt.criu.features: what a CRIU binary says it does beyond CRIU as released."""
import os

from migrt.criu import features


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_markers_are_found_anywhere_in_the_binary(tmp_path):
    b = tmp_path / "criu"
    write(b, b"\x7fELF" + os.urandom(300_000) + b"\0migrt-criu-feature:lazy-socket-wait\0"
          + b"x" * 5000 + b"Waiting (migrt-criu-feature:other-one)\n")
    assert features.of(str(b)) == {"lazy-socket-wait", "other-one"}
    assert features.has("lazy-socket-wait", str(b))
    assert not features.has("lazy-socket", str(b))     # a name is whole, not a prefix


def test_a_binary_without_markers_or_unreadable_has_none(tmp_path):
    b = tmp_path / "criu"
    write(b, b"\x7fELF" + b"migrt-criu-feature" + os.urandom(10_000))   # no colon, no name
    assert features.of(str(b)) == frozenset()
    empty = tmp_path / "empty"
    write(empty, b"")
    assert features.of(str(empty)) == frozenset()
    assert features.of(str(tmp_path / "missing")) == frozenset()
    write(tmp_path / "bare", b"migrt-criu-feature:")        # a marker with no name
    assert features.of(str(tmp_path / "bare")) == frozenset()


def test_a_binary_replaced_since_is_read_again(tmp_path):
    b = tmp_path / "criu"
    write(b, b"old build")
    assert features.of(str(b)) == frozenset()
    write(b, b"new build migrt-criu-feature:lazy-socket-wait")
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert features.of(str(b)) == {"lazy-socket-wait"}
