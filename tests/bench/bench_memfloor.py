"""The floor under a lazy restore's memory arrival, on this machine.

    /opt/migrt/venv/bin/python tests/bench/bench_memfloor.py [--sizes 1024,4096] [--rounds 3]

After a lazy restore, CRIU's lazy-pages daemon puts every page it receives into the
restored process with UFFDIO_COPY, one thread. uffdfill.c does only that, into new
memory, in 2 MiB pieces (the stream's request size), so its rate is what no lazy
restore on this machine can beat, whatever the network and the page server do. Each
round fills the size twice: "cold" after the machine left its free memory alone for
--settle seconds, "warm" right after the first fill freed it. On a VM whose free pages
go back to the host (virtio-balloon free page reporting, listed below when the device
offers it), a cold fill pays the host's fault on every page: that is what a restore
meets, since the memory it gets has been free for a while.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_page_reporting():
    """"on"/"off" from the virtio-balloon device's negotiated features, or None without
    one (bit 5: VIRTIO_BALLOON_F_REPORTING)."""
    base = "/sys/bus/virtio/devices"
    for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, d, "device")) as f:
                if f.read().strip() != "0x0005":
                    continue
            with open(os.path.join(base, d, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return None


def fill(prog, mib):
    p = subprocess.run([prog, str(mib), "2048"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"uffdfill {mib} MiB failed: {p.stderr.strip()}")
    secs, rate = p.stdout.split()
    return float(secs), float(rate)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096", help="MiB, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=8.0,
                    help="seconds left idle before each cold fill")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prog = os.path.join(tmp, "uffdfill")
        subprocess.run(["gcc", "-O2", "-o", prog, os.path.join(HERE, "uffdfill.c")], check=True)
        fpr = free_page_reporting()
        print(f"free page reporting (virtio-balloon): {fpr or 'no such device'}")
        print(f"{'MiB':>6}  {'cold MB/s':>10}  {'warm MB/s':>10}  cold fill of 1 GiB")
        for mib in [int(s) for s in a.sizes.split(",")]:
            cold, warm = [], []
            for _ in range(a.rounds):
                time.sleep(a.settle)
                cold.append(fill(prog, mib)[1])
                warm.append(fill(prog, mib)[1])
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"{mib:>6}  {c:>10.0f}  {w:>10.0f}  {1073.7 / c:.2f} s   "
                  f"(cold {', '.join(f'{x:.0f}' for x in cold)}; warm {', '.join(f'{x:.0f}' for x in warm)})")


if __name__ == "__main__":
    main()
