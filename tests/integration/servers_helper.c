/* Small workloads for tests/integration/test_migrate_servers.py (static, run in a
 * busybox container):
 *   servers_helper lock FILE       hold a flock and a POSIX lock on FILE, then sleep
 *   servers_helper backlog PORT    listen on PORT and never accept (connections the
 *                                  kernel completes stay in the listen queue: in flight)
 *   servers_helper uring           hold an io_uring instance (something CRIU cannot dump)
 *   servers_helper mlocked MIB     fill MIB of memory locked in RAM (MAP_LOCKED: CRIU
 *                                  cannot leave it lazy), then check it every 0.1 s
 *                                  (the rounds in /tmp/round; a wrong byte ends it)
 *   servers_helper protnone MIB    fill MIB of private memory, then make it PROT_NONE (no
 *                                  one can read it with process_vm_readv); counts rounds
 *                                  in /tmp/round, and whenever /tmp/check appears makes
 *                                  it readable, checks every byte and writes the verdict
 *                                  to /tmp/verdict ("ok ROUND" or the wrong byte)
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void forever(void)
{
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "lock")) {
		int fd = open(argv[2], O_RDWR | O_CREAT, 0644);
		struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1 };
		int fd2 = open(argv[2], O_RDWR);
		if (fd < 0 || fd2 < 0 || fcntl(fd, F_SETLK, &fl) || flock(fd2, LOCK_SH)) {
			perror("lock");
			return 1;
		}
		printf("locked\n");
		fflush(stdout);
		forever();
	}
	if (argc == 3 && !strcmp(argv[1], "backlog")) {
		int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 16)) {
			perror("listen");
			return 1;
		}
		printf("listening\n");
		fflush(stdout);
		forever();
	}
	if (argc == 2 && !strcmp(argv[1], "uring")) {
		unsigned char params[120];
		memset(params, 0, sizeof(params));
		long fd = syscall(425 /* io_uring_setup */, 4, params);
		if (fd < 0) {
			perror("io_uring_setup");
			return 1;
		}
		printf("uring\n");
		fflush(stdout);
		forever();
	}
	if (argc == 3 && !strcmp(argv[1], "mlocked")) {
		size_t len = (size_t)atoi(argv[2]) << 20, i;
		unsigned long round;
		unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
		if (p == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		for (i = 0; i < len; i++)
			p[i] = (unsigned char)(i * 7 + i / 4096);
		printf("mlocked\n");
		fflush(stdout);
		for (round = 1;; round++) {
			for (i = 0; i < len; i++)
				if (p[i] != (unsigned char)(i * 7 + i / 4096)) {
					printf("wrong byte at %zu\n", i);
					fflush(stdout);
					return 1;
				}
			printf("round %lu\n", round);
			fflush(stdout);
			FILE *f = fopen("/tmp/round", "w");
			if (f) {
				fprintf(f, "%lu\n", round);
				fclose(f);
			}
			usleep(100000);
		}
	}
	if (argc == 3 && !strcmp(argv[1], "protnone")) {
		size_t len = (size_t)atoi(argv[2]) << 20, i;
		unsigned long round;
		unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		for (i = 0; i < len; i++)
			p[i] = (unsigned char)(i * 13 + i / 4096);
		if (mprotect(p, len, PROT_NONE)) {
			perror("mprotect");
			return 1;
		}
		printf("protnone\n");
		fflush(stdout);
		for (round = 1;; round++) {
			FILE *f = fopen("/tmp/round", "w");
			if (f) {
				fprintf(f, "%lu\n", round);
				fclose(f);
			}
			if (access("/tmp/check", F_OK) == 0) {
				size_t bad = len;
				if (mprotect(p, len, PROT_READ)) {
					perror("mprotect");
					return 1;
				}
				for (i = 0; i < len && bad == len; i++)
					if (p[i] != (unsigned char)(i * 13 + i / 4096))
						bad = i;
				mprotect(p, len, PROT_NONE);
				f = fopen("/tmp/verdict.new", "w");
				if (f) {
					if (bad == len)
						fprintf(f, "ok %lu\n", round);
					else
						fprintf(f, "wrong byte at %zu\n", bad);
					fclose(f);
					rename("/tmp/verdict.new", "/tmp/verdict");
				}
				unlink("/tmp/check");
			}
			usleep(100000);
		}
	}
	fprintf(stderr, "usage: servers_helper lock FILE | backlog PORT | uring | mlocked MIB | "
		"protnone MIB\n");
	return 2;
}
