/* Benchmark workload: touch MiB of anonymous memory, then keep dirtying a few pages.
 *
 * memtouch <MiB> [dirty-permille]  fills every page (half-compressible data), prints
 * "ready" and then a counter every 100 ms, rewriting dirty-permille/1000 of the pages
 * each time, so that a pre-copy round has something to send again. Built static so it
 * runs in a busybox rootfs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
	long permille = argc > 2 ? strtol(argv[2], NULL, 10) : 5;
	size_t len = mib << 20, pages = len / 4096, i;
	unsigned char *mem = malloc(len);
	unsigned long long x = 88172645463325252ULL, n = 0;

	if (!mem)
		return 1;
	for (i = 0; i < len; i += 8) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;
		/* 4 random bytes, 4 zero bytes: zstd gets about 2:1, like real heaps */
		*(unsigned int *)(mem + i) = (unsigned int)x;
		*(unsigned int *)(mem + i + 4) = 0;
	}
	printf("ready %zu MiB\n", mib);
	fflush(stdout);
	for (;;) {
		size_t k, dirty = pages * permille / 1000;
		for (k = 0; k < dirty; k++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			mem[(x % pages) * 4096 + (k % 4096)] ^= 1;
		}
		n++;
		printf("%llu\n", n);
		fflush(stdout);
		FILE *f = fopen("/tmp/count", "w");
		if (f) { fprintf(f, "%llu\n", n); fclose(f); }
		usleep(100000);
	}
}
