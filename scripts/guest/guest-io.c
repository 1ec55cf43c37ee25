/*
 * guest-io: the verifying workload that runs inside the shadowback test guest.
 *
 * Built statically at image-build time (scripts/guest/build-image.sh) and run
 * by the initramfs /init against /dev/vda.  WORKERS processes each own a
 * disjoint range of BLOCKS 4 KiB blocks and do O_DIRECT Linux AIO
 * (io_submit) in batches of DEPTH requests, all submitted before any is
 * reaped, so up to WORKERS * DEPTH requests are in flight at the device.
 * (Plain synchronous writers do not get there under TCG: the emulated vCPU
 * is the bottleneck and the device queue stays at 1-2.)  Every block is tagged
 * with a magic, its byte offset, the round and the worker id, the rest is a
 * pattern derived from (offset, round); every read is checked in full.
 *
 *   round r: for each batch: read + verify round r-1 (r > 0), write round r
 *            then: read + verify every block for round r
 *
 * Usage: guest-io DEV WORKERS DEPTH BLOCKS_PER_WORKER ROUNDS
 * Prints one summary line:
 *   GUEST-IO: blocks=N verified=V verify_fail=F io_err=E elapsed_ms=T workers=W depth=D
 * A batch never holds adjacent blocks (see worker()), so the DEPTH requests
 * stay DEPTH separate virtio-blk requests.  Depth check in docs/GUEST.md.
 * and exits 0 only if F == 0 and E == 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/aio_abi.h>

#define BS 4096
#define MAGIC 0x534844574241434bull /* "SHDWBACK" */

struct stats { uint64_t written, verified, vfail, ioerr; };


static uint64_t mix(uint64_t x)
{
	x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33; return x;
}

static void fill(uint64_t *b, uint64_t off, uint64_t round, uint64_t worker)
{
	b[0] = MAGIC; b[1] = off; b[2] = round; b[3] = worker;
	/* cheap per-word pattern: TCG guests are CPU-starved, keep the disk busy */
	uint64_t s = mix(off * 0x9e3779b97f4a7c15ull ^ round);
	for (int i = 4; i < BS / 8; i++) b[i] = s ^ (uint64_t)i * 0xd6e8feb86659fd93ull;
}

static int check(const uint64_t *got, uint64_t *want, uint64_t off, uint64_t round,
		 uint64_t worker, int wid)
{
	fill(want, off, round, worker);
	if (memcmp(got, want, BS) == 0) return 0;
	fprintf(stderr, "GUEST-IO: verify mismatch worker=%d off=%llu want(round=%llu) "
		"got(magic=%llx off=%llu round=%llu worker=%llu)\n", wid,
		(unsigned long long)off, (unsigned long long)round,
		(unsigned long long)got[0], (unsigned long long)got[1],
		(unsigned long long)got[2], (unsigned long long)got[3]);
	return 1;
}

static long sys_io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long sys_io_submit(aio_context_t c, long n, struct iocb **v) { return syscall(SYS_io_submit, c, n, v); }
static long sys_io_getevents(aio_context_t c, long mn, long n, struct io_event *ev)
{ return syscall(SYS_io_getevents, c, mn, n, ev, NULL); }

/* Issue one batch of n requests (all submitted before any is reaped, so up to
 * n are in flight at the device) and wait for all of them.  Returns the number
 * of failed requests; per-request result in res[]. */
static int batch(aio_context_t ctx, int fd, int wr, char *bufs, const uint64_t *offs, int n,
		 long long *res, int wid)
{
	struct iocb cb[n], *cbp[n];
	struct io_event ev[n];
	memset(cb, 0, sizeof(cb[0]) * n);
	for (int i = 0; i < n; i++) {
		cb[i].aio_fildes = fd;
		cb[i].aio_lio_opcode = wr ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
		cb[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * BS);
		cb[i].aio_nbytes = BS;
		cb[i].aio_offset = offs[i];
		cb[i].aio_data = i;
		cbp[i] = &cb[i];
		res[i] = -EINPROGRESS;
	}
	int done = 0, bad = 0;
	while (done < n) {
		long r = sys_io_submit(ctx, n - done, cbp + done);
		if (r <= 0) {
			fprintf(stderr, "GUEST-IO: io_submit worker=%d: %s\n", wid, strerror(r < 0 ? errno : EAGAIN));
			for (int i = done; i < n; i++) res[i] = -EIO;
			bad += n - done; n = done; break;
		}
		done += r;
	}
	for (int got = 0; got < n; ) {
		long r = sys_io_getevents(ctx, 1, n - got, ev);
		if (r < 0) { if (errno == EINTR) continue; perror("GUEST-IO: io_getevents"); exit(3); }
		for (long i = 0; i < r; i++) res[ev[i].data] = ev[i].res;
		got += r;
	}
	for (int i = 0; i < n; i++)
		if (res[i] != BS) {
			bad++;
			fprintf(stderr, "GUEST-IO: %s error worker=%d off=%llu res=%lld (%s)\n",
				wr ? "write" : "read", wid, (unsigned long long)offs[i], res[i],
				res[i] < 0 ? strerror(-res[i]) : "short");
		}
	return bad;
}

static void worker(const char *dev, int wid, int depth, uint64_t nblk, uint64_t rounds,
		   struct stats *st)
{
	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0) { perror("GUEST-IO: open"); st->ioerr++; return; }
	aio_context_t ctx = 0;
	if (sys_io_setup(depth, &ctx) < 0) { perror("GUEST-IO: io_setup"); st->ioerr++; return; }
	char *bufs; void *want;
	if (posix_memalign((void **)&bufs, BS, (size_t)BS * depth) || posix_memalign(&want, BS, BS)) {
		st->ioerr++; return;
	}
	uint64_t offs[depth]; long long res[depth];
	uint64_t base = (uint64_t)wid * nblk * BS;
	for (uint64_t r = 0; r < rounds; r++) {
		for (int phase = 0; phase < 2; phase++) {
			/* Batch j = blocks {j, j+stride, j+2*stride, ...}: never adjacent,
			 * so the block layer cannot merge a batch into one big request
			 * (contiguous 4 KiB AIOs become a single 64-128 KiB request). */
			uint64_t stride = (nblk + depth - 1) / depth;
			for (uint64_t j = 0; j < stride; j++) {
				int n = 0;
				for (uint64_t i = j; i < nblk && n < depth; i += stride) offs[n++] = base + i * BS;
				if (phase == 0 && r > 0) { /* the previous round must still be there */
					st->ioerr += batch(ctx, fd, 0, bufs, offs, n, res, wid);
					for (int k = 0; k < n; k++) if (res[k] == BS) {
						if (check((uint64_t *)(bufs + (size_t)k * BS), want, offs[k], r - 1, wid, wid)) st->vfail++;
						else st->verified++;
					}
				}
				if (phase == 0) {
					for (int k = 0; k < n; k++) fill((uint64_t *)(bufs + (size_t)k * BS), offs[k], r, wid);
					int bad = batch(ctx, fd, 1, bufs, offs, n, res, wid);
					st->ioerr += bad; st->written += n - bad;
				} else {
					st->ioerr += batch(ctx, fd, 0, bufs, offs, n, res, wid);
					for (int k = 0; k < n; k++) if (res[k] == BS) {
						if (check((uint64_t *)(bufs + (size_t)k * BS), want, offs[k], r, wid, wid)) st->vfail++;
						else st->verified++;
					}
				}
			}
		}
		if (wid == 0) { /* progress, so a stalled run can be told from a slow one */
			struct timespec now;
			clock_gettime(CLOCK_MONOTONIC, &now);
			printf("GUEST-IO: progress worker 0 finished round %llu at %ld.%03ld s (monotonic)\n",
			       (unsigned long long)r, (long)now.tv_sec, now.tv_nsec / 1000000);
			fflush(stdout);
		}
		/* stop early after too many failures to keep the log readable */
		if (st->vfail + st->ioerr > 64) break;
	}
	close(fd);
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s DEV WORKERS DEPTH BLOCKS_PER_WORKER ROUNDS\n", argv[0]);
		return 2;
	}
	const char *dev = argv[1];
	int nw = atoi(argv[2]), depth = atoi(argv[3]);
	uint64_t nblk = strtoull(argv[4], 0, 0), rounds = strtoull(argv[5], 0, 0);
	if (nw < 1 || depth < 1 || depth > 256 || nblk < 2 * (uint64_t)depth) {
		fprintf(stderr, "bad arguments (need BLOCKS_PER_WORKER >= 2 * DEPTH)\n"); return 2;
	}
	struct stats *st = mmap(0, sizeof(*st) * nw, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (st == MAP_FAILED) { perror("mmap"); return 2; }
	memset(st, 0, sizeof(*st) * nw);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int w = 0; w < nw; w++) {
		pid_t p = fork();
		if (p == 0) { worker(dev, w, depth, nblk, rounds, &st[w]); _exit(0); }
		if (p < 0) { perror("fork"); return 2; }
	}
	while (wait(NULL) > 0) ;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	struct stats s = {0};
	for (int w = 0; w < nw; w++) {
		s.written += st[w].written; s.verified += st[w].verified;
		s.vfail += st[w].vfail; s.ioerr += st[w].ioerr;
	}
	long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
	printf("GUEST-IO: blocks=%llu verified=%llu verify_fail=%llu io_err=%llu elapsed_ms=%ld "
	       "workers=%d depth=%d\n",
	       (unsigned long long)s.written, (unsigned long long)s.verified,
	       (unsigned long long)s.vfail, (unsigned long long)s.ioerr, ms, nw, depth);
	fflush(stdout);
	return (s.vfail || s.ioerr) ? 1 : 0;
}
