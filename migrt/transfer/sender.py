"""Send an image directory to an agent while CRIU may still be writing it.

The directory is cut into chunks of the manifest's chunk size; worker threads, one per
TCP stream, read a chunk, hash it (xxh3), compress it (zstd, which releases the GIL, so
streams compress in parallel) and send it. Files CRIU writes front to back (pages-*.img)
are sent as they grow: a chunk goes as soon as it is complete; everything else goes once
the dump has finished. In delta mode (pre-copy's second round) a worker compares each
block with the block at the same offset of the previous round and sends only those that
differ. The digests computed on the way become the manifest: nothing is read twice.

With `pipes`, the page files CRIU will write (pages-1.img, pages-2.img, ...) are made
FIFOs before the dump starts: CRIU splices the frozen tasks' pages into them, and the
sender reads them straight from the pipe. The pages then never land on this node's
tmpfs, which saves writing, reading back and freeing them, all while the container is
frozen. A page file CRIU needs beyond the FIFOs made is a plain file, sent as it grows.
"""
import errno
import fcntl
import fnmatch
import os
import queue
import select
import socket
import threading
import time

import xxhash
import zstandard

from migrt.image import digest
from migrt.transfer import holes, wire

TAIL = ("pages-*.img",)
BLOCK = 64 << 10
F_SETPIPE_SZ = 1031


def _pipe_max():
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class PagePipes:
    """pages-N.img made FIFOs in an image dir, read as CRIU writes them.

    A FIFO opened for reading before its writer reports neither data nor a hang-up
    until a writer has come, so once CRIU has exited, the FIFOs that never showed
    anything are the ones it did not need: they are removed, and only those it wrote
    are reported (with their sizes).
    """

    def __init__(self, image_dir, count, chunk):
        self.image_dir = image_dir
        self.chunk = chunk
        self.fds = {}           # fd -> [rel, emitted bytes, buffer or None, bytes in buffer]
        self.sizes = {}         # rel -> size, for each page file CRIU wrote
        self.error = None
        size = min(_pipe_max(), 4 << 20)
        for i in range(1, count + 1):
            rel = f"pages-{i}.img"
            path = os.path.join(image_dir, rel)
            os.mkfifo(path, 0o600)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:      # fewer, larger splices for CRIU; a smaller pipe only costs wakeups
                fcntl.fcntl(fd, F_SETPIPE_SZ, size)
            except OSError:
                pass
            self.fds[fd] = [rel, 0, None, 0]
        self.names = {st[0] for st in self.fds.values()}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()    # wake() never writes to a closed (reused) fd

    def wake(self):
        """The writer is done (call after finished() turns true): stop waiting at once."""
        with self._lock:
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass

    def run(self, finished, emit, buffers, failed):
        """Read every FIFO until CRIU is done: emit(rel, off, n, buf) for each chunk (and
        an empty one for an empty file). After a failure the pipes are still drained, so
        that CRIU never blocks on a full one, but nothing more is emitted."""
        ep = select.epoll()
        scratch = bytearray(1 << 20)
        broken = []

        def stop():
            return bool(broken) or failed()
        try:
            for fd in self.fds:
                ep.register(fd, select.EPOLLIN)
            ep.register(self._wake_r, select.EPOLLIN)
            live = set(self.fds)
            while live:
                done = finished()       # sampled before the poll: nothing is missed
                events = ep.poll(0 if done else 0.5)
                if done and all(fd == self._wake_r for fd, _ in events):
                    break
                for fd, _ in events:
                    if fd == self._wake_r:
                        continue        # finished() is true now: the next round ends it
                    try:
                        end = self._read(fd, emit, buffers, stop, scratch)
                    except Exception as e:        # from here on only drain the others
                        broken.append(e)
                        self.error = f"reading {self.fds[fd][0]} from CRIU: {e}"
                        ep.unregister(fd)
                        live.discard(fd)
                        continue
                    if end:
                        ep.unregister(fd)
                        live.discard(fd)
                        self.sizes[self.fds[fd][0]] = self.fds[fd][1]
        finally:
            ep.close()
            with self._lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = None
            for fd, st in self.fds.items():
                os.close(fd)
                try:   # the FIFOs go; CRIU's page files exist only on the destination
                    os.unlink(os.path.join(self.image_dir, st[0]))
                except OSError:
                    pass

    def _read(self, fd, emit, buffers, failed, scratch):
        """Read what is in one FIFO; True at its end."""
        st = self.fds[fd]
        while True:
            if failed():
                st[2] = None
                try:
                    n = os.readv(fd, [scratch])
                except BlockingIOError:
                    return False
                if not n:
                    return True
                continue
            if st[2] is None:
                try:
                    st[2], st[3] = buffers.get(timeout=0.1), 0
                except queue.Empty:
                    continue
            buf = st[2]
            try:
                n = os.readv(fd, [buf[st[3]:self.chunk]])
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            st[3] += n
            if st[3] == self.chunk or (n == 0 and (st[3] or st[1] == 0)):
                emit(st[0], st[1], st[3], buf)
                st[1] += st[3]
                st[2] = None
            if n == 0:
                if st[2] is not None:
                    buffers.put(st[2])
                    st[2] = None
                return True


class TransferError(Exception):
    """The transfer failed; the message says where."""


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.raw = 0          # bytes of image covered
        self.sent_raw = 0     # bytes actually sent (before compression)
        self.wire = 0         # bytes on the wire (after compression)
        self.chunks = 0
        self.cpu_compress = 0.0

    def add(self, raw, sent_raw, wire_bytes, cpu):
        with self.lock:
            self.raw += raw
            self.sent_raw += sent_raw
            self.wire += wire_bytes
            self.chunks += 1
            self.cpu_compress += cpu


class Sender:
    """One round of sending a directory over `streams` authenticated data connections."""

    def __init__(self, address, secret, mid, streams=4, level=1, chunk=digest.CHUNK,
                 progress=None, hello_extra=None, want_blocks=True, release=False):
        self.address = address
        self.secret = secret
        self.mid = mid
        self.streams = max(1, streams)
        self.level = level
        self.chunk = chunk
        self.progress = progress
        self.stats = Stats()
        self.error = None
        self._timed_out = False
        self.hello_extra = hello_extra or {}
        self.digests = {}      # rel -> {chunk index: digest}
        self.blocks = {}       # rel -> {block index: int digest} (for a later delta round)
        self.want_blocks = want_blocks
        self.release = release and holes.available
        self.lock = threading.Lock()

    conns = None

    def connect(self):
        """Open and authenticate the data connections (ahead of send(), if called early)."""
        conns = []
        try:
            for _ in range(self.streams):
                c, _ = wire.connect(self.address, self.secret,
                                    dict(self.hello_extra, op="data", mid=self.mid))
                conns.append(c)
        except BaseException:
            for c in conns:
                c.close()
            raise
        self.conns = conns
        return conns

    def _fail(self, msg, timed_out=False):
        """The transfer's error: the first one, except that a peer that timed out (a cut
        network, a host gone) is said as such even when a closed stream came first:
        the sockets a timeout ends also read as closed."""
        with self.lock:
            if self.error is None or (timed_out and not self._timed_out):
                self.error = msg
                self._timed_out = timed_out

    def _worker(self, conn, jobs, base):
        comp = zstandard.ZstdCompressor(level=self.level) if self.level > 0 else None
        rbuf = memoryview(bytearray(self.chunk))    # each chunk is read into this one buffer
        ended = False
        try:
            while True:
                job = jobs.get()
                if job is None:
                    ended = True
                    break
                if self.error:
                    continue
                rel, path, off, n, buf = job
                if buf is not None:              # read from a page FIFO
                    data = buf[:n]
                else:
                    if n > len(rbuf):
                        rbuf = memoryview(bytearray(n))
                    data = rbuf[:n]
                    with open(path, "rb", buffering=0) as f:
                        if n and os.preadv(f.fileno(), [data], off) != n:
                            raise TransferError(f"{rel}: shrank while being sent")
                idx = off // self.chunk
                d = digest.chunk_digest(data)
                blocks = {}
                mv = memoryview(data)
                old = base.get(rel) if base is not None else None
                if self.want_blocks or old is not None:
                    for b in range(0, len(data), BLOCK):
                        blocks[(off + b) // BLOCK] = xxhash.xxh3_64_intdigest(mv[b:b + BLOCK])
                with self.lock:
                    self.digests.setdefault(rel, {})[idx] = d
                    if self.want_blocks:
                        self.blocks.setdefault(rel, {}).update(blocks)
                t0 = time.thread_time()
                sent_raw = wire_bytes = 0
                if old is None:
                    pieces = [(off, data, True)]
                else:
                    pieces = []
                    for b in range(0, len(data), BLOCK):
                        if old.get((off + b) // BLOCK) != blocks[(off + b) // BLOCK]:
                            if pieces and pieces[-1][0] + len(pieces[-1][1]) == off + b:
                                prev = pieces.pop()
                                pieces.append((prev[0], prev[1] + bytes(mv[b:b + BLOCK]), False))
                            else:
                                pieces.append((off + b, bytes(mv[b:b + BLOCK]), False))
                for k, (poff, pdata, whole) in enumerate(pieces):
                    z = comp.compress(pdata) if comp else pdata
                    head = {"p": rel, "o": poff, "n": len(pdata),
                            "h": d if whole else digest.chunk_digest(pdata),
                            "z": 1 if comp else 0}
                    if whole:
                        head["c"] = idx
                    elif k == len(pieces) - 1:
                        # the chunk's last patch: the agent can check the patched chunk
                        # now, during the dump, rather than all of them at the commit
                        head["e"] = idx
                    conn.send_data(head, z)
                    sent_raw += len(pdata)
                    wire_bytes += len(z)
                if buf is not None:
                    self.buffers.put(buf)
                elif self.release:
                    # sent: this copy of the chunk is no longer needed (a rollback resumes
                    # the container, not this dump), so give its memory back now
                    holes.punch_path(path, off, n)
                self.stats.add(n, sent_raw, wire_bytes, time.thread_time() - t0)
                if self.progress:
                    self.progress(self.stats)
            conn.eof_sent = True        # the agent's next message is the worker's to read
            conn.send_json({"op": "eof"})
            conn.read_json()
        except wire.ProtocolError as e:
            self._fail(f"destination: {e}")
        except (OSError, TransferError) as e:
            if getattr(e, "errno", None) == errno.ETIMEDOUT:
                conn.broken = e         # nothing came back: there is no reason to read
                self._fail(f"transfer to {self.address}: {wire.explain(e)}", timed_out=True)
            else:
                self._fail(f"transfer to {self.address}: "
                           f"{self._reason(conn) or wire.explain(e)}")
        except Exception as e:      # noqa: BLE001 - a bug here must fail the transfer, said
            self._fail(f"transfer to {self.address}: {type(e).__name__}: {e}")
        finally:
            conn.eof_sent = True
            conn.close()
            # after a failure the other streams may be gone too: keep taking jobs (until
            # this worker's end marker) so that send() never blocks on a full queue
            while not ended:
                ended = jobs.get() is None

    def _read_pipes(self, pipes, finished, jobs):
        def emit(rel, off, n, buf):
            jobs.put((rel, None, off, n, buf))
        pipes.run(finished, emit, self.buffers, lambda: self.error is not None)
        if pipes.error:
            self._fail(pipes.error)

    def _watch(self, conns, stop, woken=None):
        """The agent sends nothing on a data connection before our eof, except its reason
        for dropping it (a record that failed its check, a damaged chunk, no room), and
        then closes it. Either ends the whole transfer at once: every stream is shut, so
        that no send waits out --peer-timeout on a peer that stopped reading. `woken`:
        a pipe's read end that becomes readable when the transfer is over (its end is
        then seen at once, not at the next poll: the end of a dump is in the downtime)."""
        import select
        while not stop.is_set() and self.error is None:
            live = {c.sock.fileno(): c for c in conns if not getattr(c, "eof_sent", False)}
            live.pop(-1, None)
            if not live:
                return
            try:
                ready, _, _ = select.select(list(live) + ([woken] if woken is not None else []),
                                            [], [], 0.05)
            except (OSError, ValueError):
                continue
            for fd in ready:
                if fd == woken:
                    return
                c = live[fd]
                if getattr(c, "eof_sent", False):
                    continue
                why = self._reason(c)
                broken = getattr(c, "broken", None)
                if why is None and getattr(broken, "errno", None) == errno.ETIMEDOUT:
                    # not closed: nothing came back for the peer timeout (a cut network,
                    # a host gone), which ends the socket as readable all the same
                    self._fail(f"transfer to {self.address}: {wire.explain(broken)}",
                               timed_out=True)
                self._fail(why or f"transfer to {self.address}: the destination closed a "
                                  f"data connection")
                for k in conns:
                    try:
                        k.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    _reasons = threading.Lock()

    def _reason(self, conn):
        """The agent says why before it drops a data connection (a damaged chunk, no
        room): read that instead of reporting our own broken pipe.

        Read once per connection: the watcher and the connection's worker can both ask
        at the same moment, and two readers of one sealed stream would each get half a
        record (a full disk on the destination was then reported as a tampered record)."""
        with self._reasons:
            if hasattr(conn, "why_dropped"):
                return conn.why_dropped
            why = None
            try:
                conn.sock.settimeout(2)
                conn.read_json()
            except wire.ProtocolError as e:     # read_json raises the agent's {"error": ...}
                why = f"destination: {e}"
            except OSError as e:                # reset, or timed out (see _watch)
                conn.broken = e
            except Exception:
                pass
            conn.why_dropped = why
            return why

    def send(self, image_dir, finished, tail=TAIL, base=None, skip=(), rename=None,
             pipes=None, wake=None, early=None):
        """Send image_dir; `finished()` says whether its writer is done.

        base: the `blocks` of a previous round for a delta. rename maps a top-level
        subdir to another name on the wire. pipes: a PagePipes made in image_dir before
        its writer started. wake: a threading.Event set when the writer is done (so
        that the end is seen at once). early(): path prefixes whose files are complete
        before the writer is done. Returns {rel: (size, [chunk digests])}.
        """
        try:
            conns, self.conns = self.conns or self.connect(), None
        except BaseException:
            if pipes is not None:      # CRIU must not wait for a reader that never comes
                pipes.run(finished, None, None, lambda: True)
            raise
        jobs = queue.Queue(maxsize=self.streams * 8)
        threads = [threading.Thread(target=self._worker, args=(c, jobs, base), daemon=True)
                   for c in conns]
        for t in threads:
            t.start()
        watching = threading.Event()
        woken_r, woken_w = os.pipe2(os.O_CLOEXEC)
        watcher = threading.Thread(target=self._watch, args=(conns, watching, woken_r),
                                   daemon=True)
        watcher.start()
        queued = {}
        sizes = {}
        reader = None
        if pipes is not None:
            self.buffers = queue.Queue()
            for _ in range(self.streams * 2 + 2):
                self.buffers.put(memoryview(bytearray(self.chunk)))
            reader = threading.Thread(
                target=self._read_pipes, args=(pipes, finished, jobs), daemon=True)
            reader.start()
            skip = set(skip) | pipes.names
        try:
            while True:
                done = finished()
                if done and reader is not None:
                    reader.join()
                    sizes.update(pipes.sizes)
                ready = tuple(early()) if early is not None and not done else ()
                for rel in digest.walk_files(image_dir):
                    if rel in skip or self.error:
                        continue
                    complete = done or (ready and rel.startswith(ready))
                    tailable = any(fnmatch.fnmatch(os.path.basename(rel), p) for p in tail)
                    if not complete and not tailable:
                        continue
                    path = os.path.join(image_dir, rel)
                    try:
                        size = os.path.getsize(path)
                    except FileNotFoundError:
                        continue
                    limit = size if complete else (size // self.chunk) * self.chunk
                    pos = queued.get(rel, 0)
                    if complete and rel not in queued and size == 0:
                        jobs.put((rel, path, 0, 0, None))
                    while pos < limit:
                        n = min(self.chunk, limit - pos)
                        jobs.put((rel, path, pos, n, None))
                        pos += n
                    queued[rel] = pos
                    if complete:
                        sizes[rel] = size
                if done or self.error:
                    break
                if wake is not None:
                    wake.wait(0.01)
                else:
                    time.sleep(0.01)
        finally:
            if reader is not None and reader.is_alive():
                self._fail("transfer stopped")      # the reader now only drains CRIU
                reader.join()
            for _ in threads:
                jobs.put(None)
            for t in threads:
                t.join()
            watching.set()
            os.write(woken_w, b"x")
            watcher.join()
            os.close(woken_r)
            os.close(woken_w)
        if self.error:
            raise TransferError(self.error)
        out = {}
        for rel, size in sizes.items():
            d = self.digests.get(rel, {})
            n = (size + self.chunk - 1) // self.chunk
            out[rel] = (size, [d[i] for i in range(n)])
        return out


def manifest_files(results):
    return [{"path": rel, "size": size, "xxh3": digest.whole_digest(chunks), "chunks": chunks}
            for rel, (size, chunks) in sorted(results.items())]
