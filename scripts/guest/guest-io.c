/*
 * guest-io: the verifying workload that runs inside the shadowback test guest,
 * and (mode "check") the host-side check of the disk image it leaves behind.
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
 * A batch never holds adjacent blocks (see worker()), so the DEPTH requests
 * stay DEPTH separate virtio-blk requests.  Depth check in docs/GUEST.md.
 *
 * Usage: guest-io DEV WORKERS DEPTH BLOCKS_PER_WORKER ROUNDS [DURATION_S]
 *   DURATION_S > 0: run whole rounds until that many seconds have passed
 *   (ROUNDS is then ignored), so kills injected from outside land in it.
 *   GUEST_IO_PIN=1 in the environment pins worker W to CPU W mod the online
 *   CPUs: blk-mq submits on the queue of the submitting CPU, so with a CPU
 *   per virtqueue and a worker per CPU every virtqueue carries requests.
 * Prints, on stdout:
 *   GUEST-IO: final worker=W round=R blocks=N     (one per worker: worker W's
 *             BLOCKS blocks at byte W*N*4096 now all hold round R; R=-1: none)
 *   GUEST-IO: latency_us ios=… p50=… p99=… p999=… max=… over_10ms=… over_100ms=… over_1s=…
 *   GUEST-IO: blocks=N verified=V verify_fail=F io_err=E elapsed_ms=T workers=W depth=D rounds=…
 * and exits 0 only if F == 0 and E == 0.  Latency is per request, from the
 * io_submit of its batch to the io_getevents that returned it.
 *
 * Host side: guest-io check IMAGE BLOCKS_PER_WORKER R0 [R1 ...]
 *   reads the image and checks every block of worker W against round RW (the
 *   "final" lines above); prints
 *   HOST-CHECK: blocks=N ok=K bad=B
 *   and exits 0 only if B == 0 and N > 0.
 *
 * Guest side, network: guest-io netstats IFACE
 *   prints the interface's per-queue packet counters from the driver's
 *   ethtool statistics (virtio_net: rx_queue_N_packets, tx_queue_N_packets),
 *   one "NETSTAT NAME VALUE" line each (busybox has no ethtool).
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
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/aio_abi.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>

#define BS 4096
#define MAGIC 0x534844574241434bull /* "SHDWBACK" */
/* Latency histogram: bucket = 4 * floor(log2(us)) + the next two bits, so
 * bucket bounds are ~19 % apart; 64 * 4 buckets cover every uint64_t. */
#define NBUCKET 256

struct stats {
	uint64_t written, verified, vfail, ioerr;
	int64_t final_round;               /* last round fully written and verified */
	uint64_t rounds;                   /* rounds started */
	uint64_t nlat, maxlat_us, over10ms, over100ms, over1s;
	uint64_t hist[NBUCKET];
};

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
		 uint64_t worker)
{
	fill(want, off, round, worker);
	if (memcmp(got, want, BS) == 0) return 0;
	fprintf(stderr, "GUEST-IO: verify mismatch worker=%llu off=%llu want(round=%llu) "
		"got(magic=%llx off=%llu round=%llu worker=%llu)\n",
		(unsigned long long)worker, (unsigned long long)off, (unsigned long long)round,
		(unsigned long long)got[0], (unsigned long long)got[1],
		(unsigned long long)got[2], (unsigned long long)got[3]);
	return 1;
}

static uint64_t now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static int bucket_of(uint64_t us)
{
	if (us < 4) return (int)us; /* buckets 0..3 are exact */
	int msb = 63 - __builtin_clzll(us);
	return 4 * msb + (int)((us >> (msb - 2)) & 3);
}

static uint64_t bucket_upper(int b)
{
	if (b < 4) return (uint64_t)b;
	int msb = b / 4, sub = b % 4;
	return ((4ull + (uint64_t)sub + 1) << (msb - 2)) - 1;
}

static void record_latency(struct stats *st, uint64_t us)
{
	st->nlat++;
	st->hist[bucket_of(us)]++;
	if (us > st->maxlat_us) st->maxlat_us = us;
	if (us >= 10000) st->over10ms++;
	if (us >= 100000) st->over100ms++;
	if (us >= 1000000) st->over1s++;
}

static long sys_io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long sys_io_submit(aio_context_t c, long n, struct iocb **v) { return syscall(SYS_io_submit, c, n, v); }
static long sys_io_getevents(aio_context_t c, long mn, long n, struct io_event *ev)
{ return syscall(SYS_io_getevents, c, mn, n, ev, NULL); }

/* Issue one batch of n requests (all submitted before any is reaped, so up to
 * n are in flight at the device) and wait for all of them.  Returns the number
 * of failed requests; per-request result in res[]. */
static int batch(aio_context_t ctx, int fd, int wr, char *bufs, const uint64_t *offs, int n,
		 long long *res, int wid, struct stats *st)
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
	uint64_t t0 = now_us();
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
		uint64_t lat = now_us() - t0;
		for (long i = 0; i < r; i++) {
			if (ev[i].data >= (uint64_t)n) { fprintf(stderr, "GUEST-IO: bogus event\n"); exit(3); }
			res[ev[i].data] = ev[i].res;
			record_latency(st, lat);
		}
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
		   uint64_t until_us, struct stats *st)
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
	for (uint64_t r = 0; until_us ? (r == 0 || now_us() < until_us) : r < rounds; r++) {
		uint64_t fails_before = st->vfail + st->ioerr;
		st->rounds = r + 1;
		for (int phase = 0; phase < 2; phase++) {
			/* Batch j = blocks {j, j+stride, j+2*stride, ...}: never adjacent,
			 * so the block layer cannot merge a batch into one big request
			 * (contiguous 4 KiB AIOs become a single 64-128 KiB request). */
			uint64_t stride = (nblk + depth - 1) / depth;
			for (uint64_t j = 0; j < stride; j++) {
				int n = 0;
				for (uint64_t i = j; i < nblk && n < depth; i += stride) offs[n++] = base + i * BS;
				if (phase == 0 && r > 0) { /* the previous round must still be there */
					st->ioerr += batch(ctx, fd, 0, bufs, offs, n, res, wid, st);
					for (int k = 0; k < n; k++) if (res[k] == BS) {
						if (check((uint64_t *)(bufs + (size_t)k * BS), want, offs[k], r - 1, wid)) st->vfail++;
						else st->verified++;
					}
				}
				if (phase == 0) {
					for (int k = 0; k < n; k++) fill((uint64_t *)(bufs + (size_t)k * BS), offs[k], r, wid);
					int bad = batch(ctx, fd, 1, bufs, offs, n, res, wid, st);
					st->ioerr += bad; st->written += n - bad;
				} else {
					st->ioerr += batch(ctx, fd, 0, bufs, offs, n, res, wid, st);
					for (int k = 0; k < n; k++) if (res[k] == BS) {
						if (check((uint64_t *)(bufs + (size_t)k * BS), want, offs[k], r, wid)) st->vfail++;
						else st->verified++;
					}
				}
			}
		}
		/* Only a round without any failure leaves a known state on disk. */
		st->final_round = st->vfail + st->ioerr == fails_before ? (int64_t)r : -1;
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

static uint64_t percentile(const uint64_t *hist, uint64_t n, double q)
{
	uint64_t want = (uint64_t)(q * (double)n), seen = 0;
	if (want >= n) want = n - 1;
	for (int b = 0; b < NBUCKET; b++) {
		seen += hist[b];
		if (seen > want) return bucket_upper(b);
	}
	return 0;
}

/* Host side: verify an image against the guest's "final" lines. */
static int host_check(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s check IMAGE BLOCKS_PER_WORKER ROUND0 [ROUND1 ...]\n", argv[0]);
		return 2;
	}
	int fd = open(argv[2], O_RDONLY);
	if (fd < 0) { perror(argv[2]); return 2; }
	uint64_t nblk = strtoull(argv[3], 0, 0), total = 0, ok = 0, bad = 0;
	static uint64_t got[BS / 8], want[BS / 8];
	for (int w = 0; w + 4 < argc; w++) {
		long long round = strtoll(argv[w + 4], 0, 0);
		for (uint64_t i = 0; i < nblk; i++) {
			uint64_t off = ((uint64_t)w * nblk + i) * BS;
			total++;
			ssize_t r = pread(fd, got, BS, (off_t)off);
			if (r != BS || round < 0) { bad++; continue; }
			fill(want, off, (uint64_t)round, (uint64_t)w);
			if (memcmp(got, want, BS) == 0) { ok++; continue; }
			if (bad++ < 20) /* the first few, the count says the rest */
				fprintf(stderr, "HOST-CHECK: mismatch worker=%d off=%llu want(round=%lld) "
					"got(magic=%llx off=%llu round=%llu worker=%llu)\n", w,
					(unsigned long long)off, round, (unsigned long long)got[0],
					(unsigned long long)got[1], (unsigned long long)got[2],
					(unsigned long long)got[3]);
		}
	}
	printf("HOST-CHECK: blocks=%llu ok=%llu bad=%llu\n", (unsigned long long)total,
	       (unsigned long long)ok, (unsigned long long)bad);
	close(fd);
	return (bad == 0 && total > 0) ? 0 : 1;
}

/* The ethtool statistics of IFACE whose name holds "queue_" and ends in
 * "_packets" (SIOCETHTOOL: ETHTOOL_GSSET_INFO, GSTRINGS, GSTATS). */
static int netstats(const char *iface)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) { perror("socket"); return 2; }
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", iface);
	struct { struct ethtool_sset_info hdr; uint32_t len; } info;
	memset(&info, 0, sizeof(info));
	info.hdr.cmd = ETHTOOL_GSSET_INFO;
	info.hdr.sset_mask = 1ull << ETH_SS_STATS;
	ifr.ifr_data = (void *)&info;
	if (ioctl(fd, SIOCETHTOOL, &ifr) < 0) { perror("ETHTOOL_GSSET_INFO"); return 2; }
	uint32_t n = info.hdr.sset_mask ? info.len : 0;
	if (n == 0 || n > 4096) { fprintf(stderr, "%s: %u statistics\n", iface, n); return 2; }
	struct ethtool_gstrings *names = calloc(1, sizeof(*names) + (size_t)n * ETH_GSTRING_LEN);
	struct ethtool_stats *vals = calloc(1, sizeof(*vals) + (size_t)n * sizeof(uint64_t));
	if (!names || !vals) return 2;
	names->cmd = ETHTOOL_GSTRINGS; names->string_set = ETH_SS_STATS; names->len = n;
	ifr.ifr_data = (void *)names;
	if (ioctl(fd, SIOCETHTOOL, &ifr) < 0) { perror("ETHTOOL_GSTRINGS"); return 2; }
	vals->cmd = ETHTOOL_GSTATS; vals->n_stats = n;
	ifr.ifr_data = (void *)vals;
	if (ioctl(fd, SIOCETHTOOL, &ifr) < 0) { perror("ETHTOOL_GSTATS"); return 2; }
	for (uint32_t i = 0; i < n && i < vals->n_stats; i++) {
		char name[ETH_GSTRING_LEN + 1];
		memcpy(name, names->data + (size_t)i * ETH_GSTRING_LEN, ETH_GSTRING_LEN);
		name[ETH_GSTRING_LEN] = 0;
		size_t len = strlen(name);
		if (strstr(name, "queue_") && len > 8 && strcmp(name + len - 8, "_packets") == 0)
			printf("NETSTAT %s %llu\n", name, (unsigned long long)vals->data[i]);
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "check") == 0) return host_check(argc, argv);
	if (argc == 3 && strcmp(argv[1], "netstats") == 0) return netstats(argv[2]);
	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: %s DEV WORKERS DEPTH BLOCKS_PER_WORKER ROUNDS [DURATION_S]\n"
			"       %s check IMAGE BLOCKS_PER_WORKER ROUND0 [ROUND1 ...]\n", argv[0], argv[0]);
		return 2;
	}
	const char *dev = argv[1];
	int nw = atoi(argv[2]), depth = atoi(argv[3]);
	uint64_t nblk = strtoull(argv[4], 0, 0), rounds = strtoull(argv[5], 0, 0);
	uint64_t duration = argc == 7 ? strtoull(argv[6], 0, 0) : 0;
	if (nw < 1 || nw > 64 || depth < 1 || depth > 256 || nblk < 2 * (uint64_t)depth ||
	    (rounds < 1 && duration == 0)) {
		fprintf(stderr, "bad arguments (need 1..64 workers, depth 1..256, "
			"BLOCKS_PER_WORKER >= 2 * DEPTH, ROUNDS or DURATION_S > 0)\n");
		return 2;
	}
	struct stats *st = mmap(0, sizeof(*st) * nw, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (st == MAP_FAILED) { perror("mmap"); return 2; }
	memset(st, 0, sizeof(*st) * nw);
	uint64_t t0 = now_us();
	uint64_t until = duration ? t0 + duration * 1000000u : 0;
	const char *pin = getenv("GUEST_IO_PIN");
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	for (int w = 0; w < nw; w++) {
		st[w].final_round = -1;
		pid_t p = fork();
		if (p == 0) {
			if (pin && strcmp(pin, "1") == 0 && ncpu > 1) {
				cpu_set_t set;
				CPU_ZERO(&set);
				CPU_SET(w % ncpu, &set);
				if (sched_setaffinity(0, sizeof(set), &set) < 0)
					perror("GUEST-IO: sched_setaffinity");
			}
			worker(dev, w, depth, nblk, rounds, until, &st[w]);
			_exit(0);
		}
		if (p < 0) { perror("fork"); return 2; }
	}
	while (wait(NULL) > 0) ;
	uint64_t ms = (now_us() - t0) / 1000;
	struct stats s;
	memset(&s, 0, sizeof(s));
	for (int w = 0; w < nw; w++) {
		s.written += st[w].written; s.verified += st[w].verified;
		s.vfail += st[w].vfail; s.ioerr += st[w].ioerr; s.rounds += st[w].rounds;
		s.nlat += st[w].nlat; s.over10ms += st[w].over10ms;
		s.over100ms += st[w].over100ms; s.over1s += st[w].over1s;
		if (st[w].maxlat_us > s.maxlat_us) s.maxlat_us = st[w].maxlat_us;
		for (int b = 0; b < NBUCKET; b++) s.hist[b] += st[w].hist[b];
		printf("GUEST-IO: final worker=%d round=%lld blocks=%llu\n", w,
		       (long long)st[w].final_round, (unsigned long long)nblk);
	}
	if (s.nlat > 0)
		printf("GUEST-IO: latency_us ios=%llu p50=%llu p99=%llu p999=%llu max=%llu "
		       "over_10ms=%llu over_100ms=%llu over_1s=%llu\n",
		       (unsigned long long)s.nlat,
		       (unsigned long long)percentile(s.hist, s.nlat, 0.50),
		       (unsigned long long)percentile(s.hist, s.nlat, 0.99),
		       (unsigned long long)percentile(s.hist, s.nlat, 0.999),
		       (unsigned long long)s.maxlat_us, (unsigned long long)s.over10ms,
		       (unsigned long long)s.over100ms, (unsigned long long)s.over1s);
	printf("GUEST-IO: blocks=%llu verified=%llu verify_fail=%llu io_err=%llu elapsed_ms=%llu "
	       "workers=%d depth=%d rounds=%llu\n",
	       (unsigned long long)s.written, (unsigned long long)s.verified,
	       (unsigned long long)s.vfail, (unsigned long long)s.ioerr, (unsigned long long)ms,
	       nw, depth, (unsigned long long)s.rounds);
	fflush(stdout);
	return (s.vfail || s.ioerr) ? 1 : 0;
}
