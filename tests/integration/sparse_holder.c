/*
 * A process whose memory is mostly holes: a 1 GiB anonymous mapping of which it wrote
 * one page in 16, one 16 MiB block, and a 4 MiB block it then gave back
 * (MADV_DONTNEED). Every 100 ms it checks all of it: each written page holds what it
 * last wrote there, every other page reads zero. It rewrites a few pages each round
 * (eight of the one-in-16 pages and one of the block) and, every round, also reads
 * through a few never-written pages (faults on holes).
 *
 * Where the kernel has guard regions (6.13 on), one page is a guard page, and must stay one.
 * SIGUSR1 marks the whole mapping MADV_DONTFORK (its VmFlags change, its layout does not).
 *
 * /tmp/sparse.status: "ROUND RSS_KB GUARD" after each good round (GUARD: 1 if there is a
 * guard page, checked every round through /proc/self/pagemap).
 * /tmp/sparse.bad:    what was wrong, once (the process then stops checking).
 *
 * Used by tests/integration/test_migrate.py (lazy mode's holes).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define SIZE (1UL << 30)
#define NPAGES (SIZE / PAGE)
#define BLOCK_AT (512UL << 20)
#define BLOCK_LEN (16UL << 20)
#define GONE_AT (768UL << 20)
#define GONE_LEN (4UL << 20)
#define GUARD_AT (896UL << 20) /* a guard page (MADV_GUARD_INSTALL), where the kernel has them */
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

static unsigned char *mem;
static uint32_t gen[NPAGES]; /* 0: never written */

static uint64_t word(unsigned long page, uint32_t g, unsigned long j)
{
	uint64_t x = (page * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)g << 32) ^ (j * 0xbf58476d1ce4e5b9ULL);

	return x ^ (x >> 29);
}

static void write_page(unsigned long p)
{
	uint64_t *w = (uint64_t *)(mem + p * PAGE);
	unsigned long j;

	gen[p]++;
	for (j = 0; j < PAGE / 8; j++)
		w[j] = word(p, gen[p], j);
}

static void bad(const char *what, unsigned long p)
{
	FILE *f = fopen("/tmp/sparse.bad", "w");

	if (f) {
		fprintf(f, "%s at page %lu (gen %u)\n", what, p, gen[p]);
		fclose(f);
	}
	for (;;)
		pause();
}

static long rss_kb(void)
{
	char line[256];
	long kb = -1;
	FILE *f = fopen("/proc/self/status", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

/* is the page at addr a guard page (pagemap bit 58)? */
static int is_guard(const void *addr)
{
	uint64_t pme = 0;
	FILE *f = fopen("/proc/self/pagemap", "r");

	if (!f)
		return -1;
	if (fseek(f, (long)((uintptr_t)addr / PAGE * 8), SEEK_SET) || fread(&pme, 8, 1, f) != 1)
		pme = 0;
	fclose(f);
	return !!(pme & (1ULL << 58));
}

static void dontfork(int sig)
{
	(void)sig;
	madvise(mem, SIZE, MADV_DONTFORK);
}

int main(void)
{
	int guard;
	unsigned long p, j, round = 0, hole = 1;
	static const uint64_t zero[PAGE / 8];

	mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		return 1;
	for (p = 0; p < NPAGES; p += 16)
		write_page(p);
	for (p = BLOCK_AT / PAGE; p < (BLOCK_AT + BLOCK_LEN) / PAGE; p++)
		write_page(p);
	for (p = GONE_AT / PAGE; p < (GONE_AT + GONE_LEN) / PAGE; p++)
		write_page(p);
	madvise(mem + GONE_AT, GONE_LEN, MADV_DONTNEED);
	for (p = GONE_AT / PAGE; p < (GONE_AT + GONE_LEN) / PAGE; p++)
		gen[p] = 0;
	gen[GUARD_AT / PAGE] = 0;
	guard = madvise(mem + GUARD_AT, PAGE, MADV_GUARD_INSTALL) == 0;
	signal(SIGUSR1, dontfork);

	for (;;) {
		/*
		 * first, a few never-written pages, read through: each a fault on a hole,
		 * also while a lazy restore's memory is still coming
		 */
		for (j = 0; j < 64; j++) {
			hole = (hole * 1103515245 + 12345) % NPAGES;
			if (hole == GUARD_AT / PAGE)
				continue;
			if (!gen[hole] && memcmp(mem + hole * PAGE, zero, PAGE))
				bad("not zero", hole);
		}
		for (p = 0; p < NPAGES; p++) {
			const uint64_t *w = (const uint64_t *)(mem + p * PAGE);

			if (!gen[p])
				continue;
			for (j = 0; j < PAGE / 8; j++)
				if (w[j] != word(p, gen[p], j))
					bad("wrong content", p);
		}
		for (p = GONE_AT / PAGE; p < (GONE_AT + GONE_LEN) / PAGE; p += 7)
			if (!gen[p] && memcmp(mem + p * PAGE, zero, PAGE))
				bad("given back, not zero", p);
		if (guard && is_guard(mem + GUARD_AT) != 1)
			bad("guard page gone", GUARD_AT / PAGE);
		for (j = 0; j < 8; j++) {
			p = ((round * 8 + j) * 16 * 31) % NPAGES / 16 * 16;
			if (p != GUARD_AT / PAGE)
				write_page(p);
		}
		/* and one page of the written block: a run of pages with one changed */
		write_page(BLOCK_AT / PAGE + (round * 37) % (BLOCK_LEN / PAGE));
		round++;
		FILE *f = fopen("/tmp/sparse.status.new", "w");
		if (f) {
			fprintf(f, "%lu %ld %d\n", round, rss_kb(), guard);
			fclose(f);
			rename("/tmp/sparse.status.new", "/tmp/sparse.status");
		}
		usleep(100000);
	}
}
