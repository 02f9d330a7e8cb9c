/* How fast a process can read another's memory, the two ways CRIU's page server can
 * (packaging/criu-patches/lazy-pages-served-from-task.patch): process_vm_readv and
 * pread of /proc/PID/mem, in 2 MiB pieces into one buffer, as the page server does.
 *
 *   cc -O2 -o taskread tests/bench/taskread.c && ./taskread [MIB [ROUNDS]]
 *
 * A child holds MIB of written private memory; the parent reads all of it ROUNDS times
 * each way, alternating, and prints each round's rate and the medians. The memory is
 * not shared with the parent (the child writes every page after the fork). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PIECE (2UL << 20)

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	size_t len = (size_t)(argc > 1 ? atol(argv[1]) : 1024) << 20, off, i;
	int rounds = argc > 2 ? atoi(argv[2]) : 5, r, ready[2], fd;
	double pvm[64], prd[64], t;
	char *mem, *buf, path[64], c;
	pid_t pid;

	if (!len || len % PIECE || rounds < 1 || rounds > 64) {
		fprintf(stderr, "usage: taskread [MIB (even)] [ROUNDS (1-64)]\n");
		return 2;
	}
	mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	buf = malloc(PIECE);
	if (mem == MAP_FAILED || !buf || pipe(ready)) {
		perror("taskread");
		return 1;
	}
	memset(buf, 0, PIECE);
	pid = fork();
	if (pid == 0) {
		for (i = 0; i < len; i += 512)
			mem[i] = (char)i;
		if (write(ready[1], "r", 1) != 1)
			_exit(1);
		pause();
		_exit(0);
	}
	if (pid < 0 || read(ready[0], &c, 1) != 1) {
		perror("taskread: child");
		return 1;
	}
	snprintf(path, sizeof(path), "/proc/%d/mem", pid);
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	for (r = 0; r < rounds; r++) {
		t = now();
		for (off = 0; off < len; off += PIECE) {
			struct iovec l = { buf, PIECE }, rm = { mem + off, PIECE };

			if (process_vm_readv(pid, &l, 1, &rm, 1, 0) != (ssize_t)PIECE) {
				perror("process_vm_readv");
				return 1;
			}
		}
		pvm[r] = len / (now() - t) / 1e6;
		t = now();
		for (off = 0; off < len; off += PIECE)
			if (pread(fd, buf, PIECE, (off_t)(unsigned long)(mem + off)) != (ssize_t)PIECE) {
				perror("pread");
				return 1;
			}
		prd[r] = len / (now() - t) / 1e6;
		printf("round %d: process_vm_readv %.0f MB/s, /proc/PID/mem %.0f MB/s\n", r + 1,
		       pvm[r], prd[r]);
	}
	qsort(pvm, rounds, sizeof(double), cmp);
	qsort(prd, rounds, sizeof(double), cmp);
	printf("median: process_vm_readv %.0f MB/s, /proc/PID/mem %.0f MB/s\n", pvm[rounds / 2],
	       prd[rounds / 2]);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return 0;
}
