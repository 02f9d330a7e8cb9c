"""migrt.criu.lazycheck: when CRIU's page server (lazy migration's source) can size its pipe."""
from migrt.criu import lazycheck


def reader(cap_eff, limit):
    files = {"/proc/self/status": f"Name:\tx\nCapEff:\t{cap_eff}\n",
             lazycheck.PIPE_MAX: f"{limit}\n"}

    def read(path):
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]
    return read


WITHOUT_SYS_RESOURCE = "000001fffeffffff"     # root in this VM: bit 24 cleared
WITH_SYS_RESOURCE = "000001ffffffffff"


def test_small_limit_without_the_capability_is_a_problem():
    why = lazycheck.problem(reader(WITHOUT_SYS_RESOURCE, 1048576))
    assert why and "fs.pipe-max-size is 1048576" in why and "sysctl -w" in why


def test_limit_of_4_mib_is_enough():
    assert lazycheck.problem(reader(WITHOUT_SYS_RESOURCE, 4 << 20)) is None


def test_the_capability_lifts_the_limit():
    assert lazycheck.problem(reader(WITH_SYS_RESOURCE, 65536)) is None


def test_unknown_is_not_a_refusal():
    assert lazycheck.problem(lambda path: (_ for _ in ()).throw(FileNotFoundError(path))) is None
