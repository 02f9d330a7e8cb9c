/* The floor of lazy mode's page stream on this machine: what moving MIB of one
 * process's memory into another process's fresh memory costs when nothing but the
 * unavoidable work is done, with the same parts as migrt's lazy migration (README,
 * "Issue 17's targets"):
 *
 *   source end:      process_vm_readv from a stopped process (the frozen task),
 *                    AES-128-GCM (OpenSSL, its fastest code on this CPU), TCP send
 *   destination end: TCP receive, decryption in place, UFFDIO_COPY into a
 *                    userfaultfd-registered mapping (the restored task's memory)
 *
 * both over loopback, one thread per end, frames of FRAME_KIB (default 256 KiB)
 * with a 16-byte tag each: no TLS record layer, no requests, no CRIU, no workload.
 * What the two ends' CPU adds up to here is the least any implementation of the
 * stream pays per GiB on this machine, and with both ends on its 2 cores the wall
 * time is the best arrival time it can have.
 *
 *   cc -O2 -o streamfloor tests/bench/streamfloor.c -lcrypto -lpthread
 *   ./streamfloor [MIB [ROUNDS [FRAME_KIB [plain]]]]
 *
 * "plain" leaves the encryption out (what kernel or NIC TLS offload would take off
 * the CPU). Each round prints the wall time from the first read to the last
 * UFFDIO_COPY, the rate, and each end's CPU seconds per GiB; then the medians. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TAG 16

static unsigned char key[16];
static int plain;

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_self(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	       ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void nonce(unsigned char iv[12], uint64_t n)
{
	memset(iv, 0, 12);
	memcpy(iv + 4, &n, 8);
}

static void full_send(int fd, const void *p, size_t n)
{
	while (n) {
		ssize_t k = send(fd, p, n, 0);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("send");
		}
		p = (const char *)p + k;
		n -= k;
	}
}

static void full_recv(int fd, void *p, size_t n)
{
	while (n) {
		ssize_t k = recv(fd, p, n, MSG_WAITALL);

		if (k <= 0) {
			if (k < 0 && errno == EINTR)
				continue;
			die("recv");
		}
		p = (char *)p + k;
		n -= k;
	}
}

/* the source end: read the task's memory, encrypt, send */
static void source(pid_t task, char *addr, size_t len, size_t frame, int port, int out)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	char *buf = malloc(frame), *ct = malloc(frame + TAG + 8);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1, outl;
	unsigned char iv[12];
	double c0, t0;
	uint64_t n = 0;
	size_t off;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c0 = cpu_self();
	t0 = now();
	for (off = 0; off < len; off += frame, n++) {
		struct iovec l = { buf, frame }, r = { addr + off, frame };
		uint32_t hdr = frame;

		if (process_vm_readv(task, &l, 1, &r, 1, 0) != (ssize_t)frame)
			die("process_vm_readv");
		memcpy(ct, &hdr, 4);
		if (plain) {
			struct iovec v[2] = { { ct, 4 }, { buf, frame } };
			struct msghdr m = { .msg_iov = v, .msg_iovlen = 2 };
			size_t left = 4 + frame;

			while (left) {      /* short sends: finish the frame */
				ssize_t k = sendmsg(fd, &m, 0);

				if (k < 0)
					die("sendmsg");
				left -= k;
				while (k && m.msg_iovlen) {
					size_t s = k < (ssize_t)m.msg_iov->iov_len ? (size_t)k :
						   m.msg_iov->iov_len;
					m.msg_iov->iov_base = (char *)m.msg_iov->iov_base + s;
					m.msg_iov->iov_len -= s;
					k -= s;
					if (!m.msg_iov->iov_len) {
						m.msg_iov++;
						m.msg_iovlen--;
					}
				}
			}
			continue;
		}
		nonce(iv, n);
		if (!EVP_EncryptInit_ex(ctx, EVP_aes_128_gcm(), NULL, key, iv) ||
		    !EVP_EncryptUpdate(ctx, NULL, &outl, ct, 4) ||          /* header: AAD */
		    !EVP_EncryptUpdate(ctx, (unsigned char *)ct + 4, &outl,
				       (unsigned char *)buf, frame) ||
		    !EVP_EncryptFinal_ex(ctx, (unsigned char *)ct + 4 + frame, &outl) ||
		    !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, ct + 4 + frame))
			die("encrypt");
		full_send(fd, ct, 4 + frame + TAG);
	}
	{
		double r[2] = { now() - t0, cpu_self() - c0 };

		if (write(out, r, sizeof(r)) != sizeof(r))
			die("write");
	}
	char ack;
	full_recv(fd, &ack, 1);         /* the destination has it all */
	close(fd);
}

/* the destination end: receive, decrypt in place, UFFDIO_COPY into fresh memory */
static void destination(int lfd, size_t len, size_t frame, int out)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	char *buf = aligned_alloc(4096, frame + TAG + 4096);
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC), fd, outl;
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	unsigned char iv[12];
	char *dst;
	double c0, t0;
	uint64_t n = 0;
	size_t off;

	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
		die("userfaultfd");
	dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dst == MAP_FAILED)
		die("mmap");
	reg.range.start = (unsigned long)dst;
	reg.range.len = len;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	fd = accept(lfd, NULL, NULL);
	if (fd < 0)
		die("accept");
	c0 = cpu_self();
	t0 = 0;
	for (off = 0; off < len; off += frame, n++) {
		struct uffdio_copy cp;
		uint32_t hdr;

		full_recv(fd, &hdr, 4);
		if (!t0)
			t0 = now();
		if (hdr != frame)
			die("frame");
		full_recv(fd, buf, frame + (plain ? 0 : TAG));
		if (!plain) {
			nonce(iv, n);
			if (!EVP_DecryptInit_ex(ctx, EVP_aes_128_gcm(), NULL, key, iv) ||
			    !EVP_DecryptUpdate(ctx, NULL, &outl, (unsigned char *)&hdr, 4) ||
			    !EVP_DecryptUpdate(ctx, (unsigned char *)buf, &outl,
					       (unsigned char *)buf, frame) ||
			    !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, buf + frame) ||
			    EVP_DecryptFinal_ex(ctx, (unsigned char *)buf + frame, &outl) <= 0) {
				fprintf(stderr, "frame %llu: tag mismatch\n", (unsigned long long)n);
				exit(1);
			}
		}
		cp.dst = (unsigned long)dst + off;
		cp.src = (unsigned long)buf;
		cp.len = frame;
		cp.mode = 0;
		if (ioctl(uffd, UFFDIO_COPY, &cp) || cp.copy != (long)frame)
			die("UFFDIO_COPY");
	}
	{
		double r[2] = { now() - t0, cpu_self() - c0 };

		if (write(out, r, sizeof(r)) != sizeof(r))
			die("write");
	}
	/* what came is what the task holds: its pages carry their own page number */
	for (off = 0; off < len; off += 4096)
		if (*(uint64_t *)(dst + off) != off / 4096) {
			fprintf(stderr, "page %zu: wrong content\n", off / 4096);
			exit(1);
		}
	full_send(fd, "k", 1);
	close(fd);
	munmap(dst, len);
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? atol(argv[1]) : 1024, len = mib << 20;
	int rounds = argc > 2 ? atoi(argv[2]) : 5, r, ready[2], so[2], de[2], lfd, one = 1;
	size_t frame = (size_t)(argc > 3 ? atol(argv[3]) : 256) << 10;
	double wall[64], scpu[64], dcpu[64], gib = len / (double)(1UL << 30);
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sa);
	char *mem, c;
	pid_t task;
	size_t off;

	plain = argc > 4 && !strcmp(argv[4], "plain");
	if (!len || rounds < 1 || rounds > 64 || !frame || len % frame || frame % 4096) {
		fprintf(stderr, "usage: streamfloor [MIB [ROUNDS [FRAME_KIB [plain]]]]\n");
		return 2;
	}
	RAND_bytes(key, sizeof(key));
	if (pipe(ready))
		die("pipe");
	mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	task = fork();
	if (!task) {            /* the frozen task: its memory written, then stopped */
		for (off = 0; off < len; off += 4096) {
			memset(mem + off, (int)(off >> 12), 4096);
			*(uint64_t *)(mem + off) = off / 4096;
		}
		if (write(ready[1], "r", 1) != 1)
			_exit(1);
		for (;;)
			pause();
	}
	if (read(ready[0], &c, 1) != 1)
		die("task");
	kill(task, SIGSTOP);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 4) ||
	    getsockname(lfd, (struct sockaddr *)&sa, &sl))
		die("listen");
	printf("%zu MiB, frames of %zu KiB, %s, one thread per end, loopback\n", mib,
	       frame >> 10, plain ? "not encrypted" : "AES-128-GCM (OpenSSL)");
	for (r = 0; r < rounds; r++) {
		pid_t s, d;
		double sr[2], dr[2];

		if (pipe(so) || pipe(de))
			die("pipe");
		d = fork();
		if (!d) {
			destination(lfd, len, frame, de[1]);
			_exit(0);
		}
		s = fork();
		if (!s) {
			source(task, mem, len, frame, ntohs(sa.sin_port), so[1]);
			_exit(0);
		}
		if (read(so[0], sr, sizeof(sr)) != sizeof(sr) || read(de[0], dr, sizeof(dr)) != sizeof(dr))
			die("an end failed");
		waitpid(s, NULL, 0);
		waitpid(d, NULL, 0);
		close(so[0]); close(so[1]); close(de[0]); close(de[1]);
		wall[r] = dr[0] > sr[0] ? dr[0] : sr[0];
		scpu[r] = sr[1] / gib;
		dcpu[r] = dr[1] / gib;
		printf("round %d: %.3f s, %.0f MB/s; CPU per GiB: source %.2f s, destination "
		       "%.2f s, both %.2f s\n", r + 1, wall[r], len / wall[r] / 1e6, scpu[r], dcpu[r],
		       scpu[r] + dcpu[r]);
		fflush(stdout);
	}
	qsort(wall, rounds, sizeof(double), cmp);
	qsort(scpu, rounds, sizeof(double), cmp);
	qsort(dcpu, rounds, sizeof(double), cmp);
	printf("median: %.3f s, %.0f MB/s; CPU per GiB: source %.2f s, destination %.2f s\n",
	       wall[rounds / 2], len / wall[rounds / 2] / 1e6, scpu[rounds / 2], dcpu[rounds / 2]);
	kill(task, SIGKILL);
	waitpid(task, NULL, 0);
	return 0;
}
