"""In the container: 8 threads counting under one lock, a ticker thread, the main thread
printing. Every line: "T total c0 .. c7" (total must equal the sum) and the thread count."""
import threading
import time

N = 8
lock = threading.Lock()
tick = threading.Condition(lock)
counts = [0] * N
total = 0
ticks = 0


def worker(i):
    global total
    while True:
        with lock:
            counts[i] += 1
            total += 1
            if i % 2:                     # odd threads wait for the ticker (futex waits)
                tick.wait(0.5)
        x = 0
        for k in range(2000):             # some CPU outside the lock
            x += k * i
        if i % 4 == 0:
            time.sleep(0.001)


def ticker():
    global ticks
    while True:
        time.sleep(0.005)
        with lock:
            ticks += 1
            tick.notify_all()


for i in range(N):
    threading.Thread(target=worker, args=(i,), daemon=True).start()
threading.Thread(target=ticker, daemon=True).start()
while True:
    time.sleep(0.1)
    with lock:
        line = f"T {total} {' '.join(map(str, counts))} {threading.active_count()} {ticks}"
    print(line, flush=True)
