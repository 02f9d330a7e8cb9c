"""In the container: a writer holding SQLite's write lock (WAL mode) and a reader.

The writer commits one numbered row per transaction, sleeping inside it (so it holds the
lock most of the time), then prints the number. A forked reader checks that the rows
have no gap and prints what it saw. Any error is printed and ends the program."""
import os
import sqlite3
import sys
import time

DB = "/data/db.sqlite"


def connect():
    db = sqlite3.connect(DB, isolation_level=None, timeout=60)
    db.execute("PRAGMA busy_timeout = 60000")
    return db


def reader():
    db = connect()
    last = 0
    while True:
        hi, count = db.execute("SELECT coalesce(max(n), 0), count(*) FROM t").fetchone()
        if hi != count or hi < last:
            say(f"ERROR reader saw max {hi}, {count} rows, before {last}")
            os._exit(1)
        last = hi
        say(f"R {hi}")
        time.sleep(0.05)


def say(line):
    """One write per line: the two processes share stdout."""
    os.write(1, (line + "\n").encode())


def main():
    db = connect()
    assert db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    db.close()
    # fork before either opens its connection: SQLite's locks must not cross a fork
    if os.fork() == 0:
        reader()
    db = connect()
    n = 0
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            n += 1
            db.execute("INSERT INTO t VALUES (?, ?)", (n, f"row {n} " + "x" * 200))
            time.sleep(0.02)
            db.execute("COMMIT")
        except Exception as e:  # noqa: BLE001
            say(f"ERROR writer: {e!r}")
            sys.exit(1)
        say(f"W {n}")


main()
