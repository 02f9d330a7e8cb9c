"""The plugin framework without root: detection and explicit choice (hookgate), the
node config's validation, per-bundle options, discovery from folders and entry points,
and the stage runner's refusal contract."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from migrt.plugins import gate as hookgate  # noqa: E402
from migrt.errors import BundleError, MigrtError, RefusedError  # noqa: E402


@pytest.fixture(autouse=True)
def node(tmp_path, monkeypatch):
    """A node of our own: config path, state dir (cache), no extra plugin folders."""
    cfg = tmp_path / "config.yaml"
    monkeypatch.setenv("MIGRT_CONFIG", str(cfg))
    monkeypatch.setenv("MIGRT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MIGRT_PLUGIN_PATH", raising=False)
    return cfg


def spec(env=(), devices=(), mounts=(), annotations=None):
    return {"process": {"env": ["PATH=/bin", *env]},
            "linux": {"devices": [{"path": p, "type": "c", "major": 1, "minor": 3}
                                  for p in devices]},
            "mounts": list(mounts), "annotations": annotations or {}}


# ---------------------------------------------------------------- hookgate

def test_plain_bundle_gets_no_plugin():
    assert hookgate.active(spec(), "/b") == []
    assert hookgate.active(spec(), "/b", stage="checkpoint") == ["logs", "isolation"]


def test_detection_only_returns_plugins_with_work_in_the_action():
    s = spec(devices=["/dev/nvidia0"])
    assert hookgate.active(s, "/b") == []                      # nothing to do on create
    assert hookgate.active(s, "/b", stage="checkpoint") == ["logs", "devices", "isolation", "gpu"]
    restored = spec(env=["MIGRT_RESTORE_FROM=/ck"], devices=["/dev/nvidia0"])
    assert hookgate.active(restored, "/b") == ["logs", "devices", "isolation", "gpu"]
    notify = spec(env=["MIGRT_NOTIFY=/run/n"])
    assert "rdma" in hookgate.active(notify, "/b", stage="checkpoint")
    hosts = spec(mounts=[{"destination": "/etc/hosts", "type": "bind", "source": "/x"}])
    why = dict((n, r) for n, ok, r in hookgate.explain(hosts, "/b", "checkpoint") if ok)
    assert why["isolation"] == "bundle bind-mounts /etc/hosts from the host"


def test_explicit_choice_wins_over_detection():
    gpu = spec(devices=["/dev/nvidia0"], annotations={"io.migrt.plugins": "rdma"})
    assert hookgate.active(gpu, "/b", stage="checkpoint") == ["rdma"]
    assert hookgate.active(gpu, "/b") == ["rdma"]              # even on create
    minus = spec(devices=["/dev/nvidia0"], annotations={"io.migrt.plugins": "-logs,-gpu"})
    assert hookgate.active(minus, "/b", stage="checkpoint") == ["devices", "isolation"]
    none = spec(devices=["/dev/nvidia0"], env=["MIGRT_PLUGINS=none"])
    assert hookgate.active(none, "/b", stage="checkpoint") == []
    both = spec(env=["MIGRT_PLUGINS=gpu"], annotations={"io.migrt.plugins": "rdma"})
    assert hookgate.active(both, "/b") == ["rdma"]             # the annotation wins
    env_only = spec(env=["MIGRT_PLUGINS=+rdma"])
    assert hookgate.active(env_only, "/b") == ["rdma"]


def test_unknown_plugin_named_by_the_bundle_is_refused_clearly():
    s = spec(annotations={"io.migrt.plugins": "nosuch"})
    names = hookgate.active(s, "/b")
    assert names == ["nosuch"]
    from migrt.plugins import run_stage
    with pytest.raises(RefusedError, match="asks for plugin 'nosuch', which is not installed"):
        run_stage("pre-create", names, spec=s, cid="c", bundle="/b", call=None)


def test_node_can_disable_detection_but_not_an_explicit_choice(node):
    node.write_text("plugins:\n  devices:\n    enabled: false\n")
    s = spec(devices=["/dev/accel0"])
    assert "devices" not in hookgate.active(s, "/b", stage="checkpoint")
    s["annotations"]["io.migrt.plugins"] = "+devices"
    assert "devices" in hookgate.active(s, "/b", stage="checkpoint")


@pytest.mark.parametrize("text,message", [
    ("plugins:\n  rdma:\n    timeout: soon\n", "plugins.rdma.timeout: 'soon' is not of type 'number'"),
    ("plugins:\n  rdma:\n    timout: 3\n", "plugins.rdma.timout: unknown key"),
    ("plugins:\n  flux: {}\n", "plugins.flux: no such plugin is installed"),
    ("plugin:\n  gpu: {}\n", "plugin: unknown key"),
    ("plugins:\n  gpu:\n    lock_timeout_ms: -5\n", "plugins.gpu.lock_timeout_ms: -5 is less than the minimum of 0"),
    ("plugins: [\n", "line 2: not valid YAML"),
])
def test_bad_node_config_is_an_error_naming_the_key(node, text, message):
    node.write_text(text)
    with pytest.raises(MigrtError) as e:
        hookgate.active(spec(), "/b")
    assert str(e.value).startswith(str(node))
    assert message in str(e.value)


def test_cache_follows_the_config_file(node):
    assert "devices" in hookgate.active(spec(devices=["/dev/a0"]), "/b", stage="checkpoint")
    node.write_text("plugins:\n  devices:\n    enabled: false\n")
    os.utime(node, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert "devices" not in hookgate.active(spec(devices=["/dev/a0"]), "/b", stage="checkpoint")


def test_hot_path_reads_only_the_cache(tmp_path):
    """hookgate on a warm cache: stdlib only, well under a millisecond a call."""
    hookgate.active(spec(), "/b")          # warms the cache
    code = textwrap.dedent(f"""
        import sys, time, json
        sys.path.insert(0, {REPO!r})
        sys.path += {[x for x in sys.path if x.endswith("-packages")]!r}   # as the launcher does
        from migrt.plugins import gate as hookgate
        s = {json.dumps(spec(devices=["/dev/accel0"]))}
        hookgate.active(s, "/b")
        t = time.perf_counter()
        for _ in range(200):
            r = hookgate.active(s, "/b")
        dt = (time.perf_counter() - t) / 200
        heavy = [m for m in ("yaml", "jsonschema", "click", "migrt.plugins.config") if m in sys.modules]
        print(json.dumps({{"r": r, "ms": dt * 1000, "heavy": heavy}}))
    """)
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["r"] == [] and out["heavy"] == []
    assert out["ms"] < 2.0, out


# ---------------------------------------------------------------- options

def test_options_annotation_beats_env_beats_node_config(node):
    node.write_text("plugins:\n  rdma:\n    timeout: 20\n")
    from migrt.plugins import options, registry
    hookgate.node_cache()
    rdma = registry.resolve(["rdma"])[0]
    assert options.for_bundle(rdma, spec())["timeout"] == 20
    assert options.for_bundle(rdma, spec(env=["MIGRT_RDMA_TIMEOUT=3"]))["timeout"] == 3.0
    s = spec(env=["MIGRT_RDMA_TIMEOUT=3"], annotations={"io.migrt.rdma.timeout": "1.5"})
    assert options.for_bundle(rdma, s)["timeout"] == 1.5
    dev = registry.resolve(["devices"])[0]
    s = spec(annotations={"io.migrt.devices.map": "/dev/a0=/dev/b1, /dev/a1=/dev/b0"})
    assert options.for_bundle(dev, s)["map"] == {"/dev/a0": "/dev/b1", "/dev/a1": "/dev/b0"}


@pytest.mark.parametrize("where,value,message", [
    ("env", "MIGRT_RDMA_TIMEOUT=soon", "env MIGRT_RDMA_TIMEOUT: 'soon' is not a number"),
    ("env", "MIGRT_RDMA_TIMOUT=3", "env MIGRT_RDMA_TIMOUT: plugin rdma has no option 'timout'"),
    ("ann", "io.migrt.rdma.require=maybe", "annotation io.migrt.rdma.require: 'maybe' is not a boolean"),
    ("ann", "io.migrt.rdma.timeout=0", "annotation io.migrt.rdma.timeout: '0' is out of range"),
])
def test_bad_bundle_option_names_the_key(where, value, message):
    from migrt.plugins import options, registry
    rdma = registry.resolve(["rdma"])[0]
    if where == "env":
        s = spec(env=[value])
    else:
        k, _, v = value.partition("=")
        s = spec(annotations={k: v})
    with pytest.raises(BundleError) as e:
        options.for_bundle(rdma, s)
    assert message in str(e.value)


# ---------------------------------------------------------------- third-party plugins

THIRD = '''
from migrt.plugins import Plugin
from migrt.errors import RefusedError
CALLS = []
class Probe(Plugin):
    name = "{name}"
    order = {order}
    detect = {{"env": ["PROBE_ME"]}}
    options = {{"refuse": {{"type": "boolean", "default": False}}}}
    def pre_checkpoint(self, ctx):
        CALLS.append(("{name}", "pre", ctx["options"]["refuse"]))
        if ctx["options"]["refuse"]:
            raise RefusedError("{name}: not today")
    def post_checkpoint(self, ctx):
        CALLS.append(("{name}", "post", ctx.get("error")))
plugin = Probe
'''


def test_plugin_from_an_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "probe_pkg").mkdir(parents=True)
    (site / "probe_pkg" / "__init__.py").write_text(THIRD.format(name="probe", order=60))
    dist = site / "migrt_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: migrt-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[migrt.plugins]\nprobe = probe_pkg:plugin\n")
    monkeypatch.syspath_prepend(str(site))
    assert hookgate.active(spec(env=["PROBE_ME=1"]), "/b", stage="checkpoint") == \
        ["logs", "isolation", "probe"]
    info = hookgate.node_cache()["plugins"]["probe"]
    assert info["source"] == {"kind": "entry-point", "where": "probe_pkg:plugin",
                              "dist": "migrt-probe"}


def test_refusal_undoes_what_earlier_plugins_did(tmp_path, monkeypatch):
    d = tmp_path / "more"
    d.mkdir()
    (d / "first.py").write_text(THIRD.format(name="first", order=1))
    (d / "second.py").write_text(THIRD.format(name="second", order=2))
    monkeypatch.setenv("MIGRT_PLUGIN_PATH", str(d))
    from migrt.plugins import run_stage
    s = spec(env=["PROBE_ME=1", "MIGRT_SECOND_REFUSE=true"])
    names = [n for n in hookgate.active(s, "/b", stage="checkpoint") if n in ("first", "second")]
    assert names == ["first", "second"]
    with pytest.raises(RefusedError, match="second: not today"):
        run_stage("pre-checkpoint", names, spec=s, cid="c", bundle="/b", call=None,
                  image_dir=str(tmp_path / "img"), mode="dump")
    calls = sys.modules["migrt_plugins.first"].CALLS + sys.modules["migrt_plugins.second"].CALLS
    assert ("first", "pre", False) in calls
    assert ("first", "post", "refused") in calls        # told to undo
    assert ("second", "post", "refused") not in calls   # it did nothing to undo


def test_plugins_command_lists_and_explains(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(spec(devices=["/dev/nvidia0"],
                                                   env=["MIGRT_NOTIFY=/run/n"])))
    p = subprocess.run([sys.executable, "-m", "migrt", "plugins", "--bundle", str(b), "--json"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["plugins"]}
    assert set(rows) >= {"devices", "isolation", "logs", "gpu", "rdma"}
    assert rows["gpu"]["applies"] and "bundle grants device /dev/nvidia0" in rows["gpu"]["why"]
    assert rows["rdma"]["options"]["notify"] == ""
    assert rows["rdma"]["why"].startswith("process.env sets MIGRT_NOTIFY=/run/n")


def test_engine_runs_stages_for_a_container_it_drives_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRT_LOG_DIR", str(tmp_path / "records"))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec(env=["MIGRT_PLUGINS=logs"])))
    root = tmp_path / "root"
    (root / "c1").mkdir(parents=True)
    (root / "c1" / "state.json").write_text(json.dumps(
        {"init_process_pid": os.getpid(), "config": {"labels": [f"bundle={bundle}"]}}))
    from migrt.plugins.engine import ForContainer
    from migrt.plugins import record
    hooks = ForContainer(str(root), "c1")
    assert hooks.names == ["logs"]
    hooks.pre_checkpoint(str(tmp_path / "img"), mode="dump")
    hooks.post_checkpoint(str(tmp_path / "img"), mode="dump", error="transfer broke")
    hooks.record({"event": "migrate", "phases": {"freeze": 0.1}, "ok": False})
    # the record is keyed by the runtime root as well as the id
    assert record.events("c1") == []
    events = record.events("c1", root=str(root))
    assert [e["event"] for e in events] == ["checkpoint", "migrate"]
    assert events[0]["error"] == "transfer broke" and events[0]["ok"] is False


def test_event_record_of_a_reused_id_stays_bounded(tmp_path, monkeypatch):
    """A container id used over and over (a name) must not make its record, and so
    every checkpoint that carries it and every restore that merges it, grow forever."""
    monkeypatch.setenv("MIGRT_LOG_DIR", str(tmp_path / "records"))
    from migrt.plugins import record
    for i in range(record.KEEP_EVENTS + 2000):
        record.append("c1", {"event": "checkpoint", "n": i, "pad": "x" * 200})
    evs = record.events("c1")
    assert len(evs) <= record.KEEP_EVENTS + (record._TRIM_AT // 250)
    assert evs[-1]["n"] == record.KEEP_EVENTS + 1999          # the newest are kept
    incoming = [{"id": f"in{i}", "time": "2999-01-01T00:00:00.000Z", "event": "restore"}
                for i in range(record.KEEP_EVENTS)]
    assert record.merge("c1", incoming) == record.KEEP_EVENTS
    evs = record.events("c1")
    assert len(evs) == record.KEEP_EVENTS and evs[-1]["id"] == f"in{record.KEEP_EVENTS - 1}"


def test_records_of_long_quiet_ids_are_swept(tmp_path, monkeypatch):
    """One record dir per container id outlives the container (`migrt logs` tells where
    it went), but not forever: ids with no event for MIGRT_RECORD_DAYS go (looked for
    at a container's delete and by the agent's janitor), at most once an hour."""
    monkeypatch.setenv("MIGRT_LOG_DIR", str(tmp_path / "records"))
    from migrt.plugins import record
    record.append("old", {"event": "checkpoint"})
    record.append("recent", {"event": "checkpoint"})
    month = time.time() - 31 * 86400
    for root, dirs, files in os.walk(tmp_path / "records" / "old"):
        for n in dirs + files + [""]:
            os.utime(os.path.join(root, n), (month, month))
    assert record.sweep() == ["old"]
    assert sorted(os.listdir(tmp_path / "records")) == [".swept", "recent"]
    assert [e["event"] for e in record.events("recent")] == ["checkpoint"]
    # within the hour nothing is looked at again, however old
    for n in ("", "events.jsonl", "criu"):
        os.utime(os.path.join(tmp_path / "records" / "recent", n), (month, month))
    assert record.sweep() == []
    assert record.sweep(now=time.time() + 7200) == ["recent"]
    monkeypatch.setenv("MIGRT_RECORD_DAYS", "0")                # 0: keep every record
    assert record.sweep(now=time.time() + 99 * 86400) == []


def test_a_preloaded_plugin_file_changed_since_is_imported_again(tmp_path):
    """A spare restorer imports the node's plugin files long before a restore: one edited
    in between is imported again when the restore loads it, not used as it was."""
    from migrt.plugins import registry
    path = tmp_path / "stamp_plugin.py"
    body = textwrap.dedent("""\
        from migrt.plugins import Plugin
        class P(Plugin):
            name = "stampplug"
            version = {v!r}
        plugin = P
        """)
    path.write_text(body.format(v="one"))
    assert registry.load_file(str(path)).version == "one"
    assert registry.load_file(str(path)).version == "one"       # kept: unchanged
    path.write_text(body.format(v="two, longer"))
    assert registry.load_file(str(path)).version == "two, longer"
