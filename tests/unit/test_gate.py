"""migrt.criu.gate's Gate and its waiting side (wait_for_go), as an armed restore and its
agent use them: real FIFOs, a real flock, a real second process."""
import os
import subprocess
import sys
import time

from migrt.criu import gate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO)
WAITER = ("import sys; from migrt.criu import gate; "
          "sys.exit(0 if gate.wait_for_go(sys.argv[1], float(sys.argv[2])) else 3)")


def waiter(d, timeout=30):
    return subprocess.Popen([sys.executable, "-c", WAITER, str(d), str(timeout)],
                            env=ENV)


def test_the_waiter_goes_on_when_the_gate_opens(tmp_path):
    g = gate.Gate(str(tmp_path))
    p = waiter(tmp_path)
    assert g.wait_ready(p, 30), "the waiter never said it was ready"
    time.sleep(0.2)
    assert p.poll() is None, "it went on before the gate opened"
    g.open()
    assert p.wait(10) == 0 and g.is_open


def test_an_aborted_gate_says_no(tmp_path):
    g = gate.Gate(str(tmp_path))
    p = waiter(tmp_path)
    assert g.wait_ready(p, 30)
    g.abort()
    assert p.wait(10) == 3 and not g.is_open


def test_the_holder_dying_says_no(tmp_path):
    """The gate's holder (the agent) dies: the kernel drops its flock, no gate.go."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from migrt.criu import gate; "
         "g = gate.Gate(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    p = waiter(tmp_path)
    time.sleep(0.3)
    assert p.poll() is None
    holder.kill()
    holder.wait()
    assert p.wait(10) == 3


def test_a_waiter_left_waiting_gives_up_after_its_timeout(tmp_path):
    g = gate.Gate(str(tmp_path))
    t0 = time.monotonic()
    p = waiter(tmp_path, 0.5)
    assert g.wait_ready(p, 30)
    assert p.wait(10) == 3
    assert time.monotonic() - t0 < 8
    g.abort()


def test_wait_ready_sees_the_process_end_first(tmp_path):
    g = gate.Gate(str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    assert g.wait_ready(p, 30) is False
    g.abort()
