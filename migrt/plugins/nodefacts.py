"""What a node offers a restored process: architecture, CPU features, kernel, CRIU and
the CRIU/kernel features container restores rely on.

The isolation plugin records these with every checkpoint and compares them with the
destination's before restoring (or, in `migrt migrate`, before touching the source,
when the destination agent reports its own with `collect()`). Cached per boot and
CRIU binary, because `criu check` costs about 15 ms a feature.
"""
import json
import os
import platform
import re
import shutil
import subprocess

# Features a runc-made container's restore can depend on (names as `criu check --feature`).
CRIU_FEATURES = ("timens", "cgroupns", "seccomp_filters", "clone3_set_tid",
                 "move_mount_set_group", "get_rseq_conf", "uffd-noncoop",
                 "network_lock_nftables")
# Features only some modes use; `migrt migrate` checks them itself (lazy mode needs
# userfaultfd; the nftables network lock is used only where both nodes have it).
OPTIONAL = frozenset({"uffd-noncoop", "network_lock_nftables"})

# /proc/cpuinfo flags that are user-visible instruction-set extensions: a program that
# found one at start-up (glibc's ifuncs, numpy, a JIT) crashes where it is missing.
ISA_FLAG = re.compile(
    r"^(mmx|sse|ssse3|avx|amx|fma|f16c|bmi|adx|aes|vaes|pclmulqdq|vpclmulqdq|sha_ni|"
    r"rdrand|rdseed|popcnt|abm|lzcnt|movbe|xsave|clflushopt|clwb|gfni|erms|fsrm|rtm|hle|"
    r"cx16|pku|waitpkg|movdiri|movdir64b|serialize|avx512|avx_vnni|vnni|fxsr|cmov|"
    r"asimd|sve|atomics|fp|crc32|sha\d|pmull|lse|sm3|sm4|dcpop|bf16|i8mm)")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return sorted(val.split())
    except OSError:
        pass
    return []


def criu_version(criu="criu"):
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\S+)", out)
    return m.group(1) if m else None


def criu_features(criu="criu"):
    out = {}
    for feat in CRIU_FEATURES:
        try:
            p = subprocess.run([criu, "check", "--feature", feat], capture_output=True,
                               text=True, timeout=10)
            out[feat] = p.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            out[feat] = False
    return out


def _cache_key(criu):
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    path = shutil.which(criu) or criu
    try:
        st = os.stat(path)
        return f"{boot}:{path}:{st.st_mtime_ns}:{','.join(CRIU_FEATURES)}"
    except OSError:
        return f"{boot}:{path}:{','.join(CRIU_FEATURES)}"


def collect(criu=None, use_cache=True):
    """This node's facts. MIGRT_NODE_FACTS names a JSON file that replaces them (to
    simulate another node's CPU or kernel on one machine)."""
    override = os.environ.get("MIGRT_NODE_FACTS")
    if override:
        with open(override) as f:
            return json.load(f)
    if not criu:
        from migrt.runc import criu_path
        criu = criu_path()
    from migrt.plugins import gate as hookgate
    cache = os.path.join(hookgate.state_dir(), "plugins", "nodefacts.json")
    key = _cache_key(criu)
    if use_cache:
        try:
            with open(cache) as f:
                data = json.load(f)
            if data.get("key") == key:
                return data["facts"]
        except (OSError, ValueError, KeyError):
            pass
    u = os.uname()
    facts = {"arch": platform.machine(), "kernel": u.release, "node": u.nodename,
             "cpu_flags": cpu_flags(), "criu": criu_version(criu),
             "criu_features": criu_features(criu)}
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            f.write(json.dumps({"key": key, "facts": facts}))
        os.replace(cache + ".tmp", cache)
    except OSError:
        pass
    return facts


def _ver(v):
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:3])


def incompatible(source, dest):
    """Reasons a process checkpointed on `source` would fail or crash on `dest` ([] = ok)."""
    problems = []
    if source.get("arch") and dest.get("arch") and source["arch"] != dest["arch"]:
        problems.append(f"architecture {dest['arch']} is not the checkpoint's {source['arch']}")
    need = {f for f in source.get("cpu_flags") or () if ISA_FLAG.match(f)}
    missing = sorted(need - set(dest.get("cpu_flags") or ()))
    if missing:
        problems.append("CPU lacks " + " ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    if source.get("criu") and dest.get("criu") and _ver(dest["criu"]) < _ver(source["criu"]):
        problems.append(f"CRIU {dest['criu']} is older than the checkpoint's {source['criu']}")
    sf, df = source.get("criu_features") or {}, dest.get("criu_features") or {}
    lost = sorted(f for f, ok in sf.items() if ok and f in df and not df[f]
                  and f not in OPTIONAL)
    if lost:
        problems.append("kernel/CRIU lack " + ", ".join(lost))
    return problems
