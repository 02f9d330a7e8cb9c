/* The floor under a lazy restore's memory arrival on this machine: how fast one thread
 * can fill new anonymous memory of another's with UFFDIO_COPY (what CRIU's lazy-pages
 * daemon does with every page it receives), in pieces of PIECE KiB.
 *
 *   uffdfill MIB PIECE_KIB       prints "<seconds> <MB/s>"
 *
 * The target is a fresh private anonymous mapping registered for missing-page faults,
 * as the restored process's memory is; the source one buffer, as the daemon's. Run
 * twice in a row, the second run shows the rate into memory the machine had just freed:
 * on a VM whose free pages go back to the host (virtio-balloon free page reporting),
 * the first run pays the host's fault on every page, as a restore does. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t len, piece, off;
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	char *dst, *buf;
	double t0, t1;
	int uffd;

	if (argc != 3) {
		fprintf(stderr, "usage: uffdfill MIB PIECE_KIB\n");
		return 2;
	}
	len = (size_t)atol(argv[1]) << 20;
	piece = (size_t)atol(argv[2]) << 10;
	if (!len || !piece || len % piece) {
		fprintf(stderr, "uffdfill: MIB must be a multiple of PIECE_KIB\n");
		return 2;
	}
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
		perror("uffdfill: userfaultfd");
		return 1;
	}
	dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	buf = malloc(piece);
	if (dst == MAP_FAILED || !buf) {
		perror("uffdfill: memory");
		return 1;
	}
	memset(buf, 0x5a, piece);
	reg.range.start = (unsigned long)dst;
	reg.range.len = len;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) {
		perror("uffdfill: UFFDIO_REGISTER");
		return 1;
	}
	t0 = now();
	for (off = 0; off < len; off += piece) {
		struct uffdio_copy cp = { .dst = (unsigned long)dst + off, .src = (unsigned long)buf,
					  .len = piece, .mode = 0 };

		if (ioctl(uffd, UFFDIO_COPY, &cp)) {
			perror("uffdfill: UFFDIO_COPY");
			return 1;
		}
	}
	t1 = now();
	printf("%.3f %.0f\n", t1 - t0, len / (t1 - t0) / 1e6);
	return 0;
}
