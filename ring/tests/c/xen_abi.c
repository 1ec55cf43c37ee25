/*
 * The C half of ring/tests/xen_abi.rs, built at test time against the Xen
 * public headers installed on the machine (libxen-dev), never against a copy.
 *
 *   xen_abi layout                  print "name value" lines: sizes, offsets,
 *                                   constants and ring sizes from the headers
 *   xen_abi front FD FRAME[,FRAME]  a blkif frontend on the memfd FD
 *   xen_abi back  FD FRAME[,FRAME]  a blkif backend on the memfd FD
 *   xen_abi netfront FD TX,RX       a netif frontend: its TX ring on frame
 *                                   TX, its RX ring on frame RX
 *
 * FRAMES are the 4 KiB pages of the memfd holding the ring, in ring order;
 * they are mapped side by side, so a ring may be scattered in the memfd.
 *
 * front/back are driven one command per stdin line and answer each with one
 * stdout line; the Rust test moves its own half of the ring between
 * commands, so the two processes never touch the ring at the same time.
 * Any disagreement is answered with "fail <why>" and exit status 1.
 *
 * Request and response contents are pure functions of a sequence number,
 * written identically in xen_abi.rs: the receiving side checks every byte.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Whatever the installed headers call their newest interface. */
#define __XEN_INTERFACE_VERSION__ __XEN_LATEST_INTERFACE_VERSION__

/* ring.h leaves the barriers to the includer from interface 0x00030208 on. */
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>

#define XEN_PAGE 4096u
#define MAX_FRAMES 16

/* ---------------------------------------------------------------- layout */

#define SIZE(kind, t) printf("sizeof.%s %zu\n", #t, sizeof(kind t))
#define OFF(t, f) printf("offsetof.%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define CONST(c) printf("const.%s %lld\n", #c, (long long)(c))
#define RING_SIZE_OF(t, bytes) \
    printf("ring_size.%s.%u %u\n", #t, (unsigned)(bytes), (unsigned)__CONST_RING_SIZE(t, bytes))

static void print_layout(void)
{
    SIZE(struct, blkif_sring);
    OFF(blkif_sring, req_prod);
    OFF(blkif_sring, req_event);
    OFF(blkif_sring, rsp_prod);
    OFF(blkif_sring, rsp_event);
    OFF(blkif_sring, ring);
    SIZE(union, blkif_sring_entry);

    SIZE(struct, blkif_request);
    OFF(blkif_request, operation);
    OFF(blkif_request, nr_segments);
    OFF(blkif_request, handle);
    OFF(blkif_request, id);
    OFF(blkif_request, sector_number);
    OFF(blkif_request, seg);

    SIZE(struct, blkif_request_segment);
    OFF(blkif_request_segment, gref);
    OFF(blkif_request_segment, first_sect);
    OFF(blkif_request_segment, last_sect);

    SIZE(struct, blkif_request_discard);
    OFF(blkif_request_discard, operation);
    OFF(blkif_request_discard, flag);
    OFF(blkif_request_discard, handle);
    OFF(blkif_request_discard, id);
    OFF(blkif_request_discard, sector_number);
    OFF(blkif_request_discard, nr_sectors);

    SIZE(struct, blkif_request_indirect);
    OFF(blkif_request_indirect, operation);
    OFF(blkif_request_indirect, indirect_op);
    OFF(blkif_request_indirect, nr_segments);
    OFF(blkif_request_indirect, id);
    OFF(blkif_request_indirect, sector_number);
    OFF(blkif_request_indirect, handle);
    OFF(blkif_request_indirect, indirect_grefs);

    SIZE(struct, blkif_response);
    OFF(blkif_response, id);
    OFF(blkif_response, operation);
    OFF(blkif_response, status);

    SIZE(struct, netif_tx_request);
    OFF(netif_tx_request, gref);
    OFF(netif_tx_request, offset);
    OFF(netif_tx_request, flags);
    OFF(netif_tx_request, id);
    OFF(netif_tx_request, size);

    SIZE(struct, netif_tx_response);
    OFF(netif_tx_response, id);
    OFF(netif_tx_response, status);

    SIZE(struct, netif_rx_request);
    OFF(netif_rx_request, id);
    OFF(netif_rx_request, pad);
    OFF(netif_rx_request, gref);

    SIZE(struct, netif_rx_response);
    OFF(netif_rx_response, id);
    OFF(netif_rx_response, offset);
    OFF(netif_rx_response, flags);
    OFF(netif_rx_response, status);

    SIZE(struct, netif_extra_info);
    OFF(netif_extra_info, type);
    OFF(netif_extra_info, flags);
    OFF(netif_extra_info, u);
    OFF(netif_extra_info, u.gso.size);
    OFF(netif_extra_info, u.gso.type);
    OFF(netif_extra_info, u.gso.pad);
    OFF(netif_extra_info, u.gso.features);
    OFF(netif_extra_info, u.mcast.addr);
    OFF(netif_extra_info, u.hash.type);
    OFF(netif_extra_info, u.hash.algorithm);
    OFF(netif_extra_info, u.hash.value);
    printf("sizeof.netif_extra_info.u %zu\n", sizeof(((struct netif_extra_info *)0)->u));
    printf("alignof.netif_extra_info %zu\n", _Alignof(struct netif_extra_info));

    SIZE(union, netif_tx_sring_entry);
    SIZE(union, netif_rx_sring_entry);
    OFF(netif_tx_sring, ring);
    OFF(netif_rx_sring, ring);

    SIZE(struct, grant_entry_v1);
    OFF(grant_entry_v1, flags);
    OFF(grant_entry_v1, domid);
    OFF(grant_entry_v1, frame);
    SIZE(, grant_ref_t);
    SIZE(, domid_t);

    CONST(BLKIF_OP_READ);
    CONST(BLKIF_OP_WRITE);
    CONST(BLKIF_OP_WRITE_BARRIER);
    CONST(BLKIF_OP_FLUSH_DISKCACHE);
    CONST(BLKIF_OP_RESERVED_1);
    CONST(BLKIF_OP_DISCARD);
    CONST(BLKIF_OP_INDIRECT);
    CONST(BLKIF_RSP_EOPNOTSUPP);
    CONST(BLKIF_RSP_ERROR);
    CONST(BLKIF_RSP_OKAY);
    CONST(BLKIF_MAX_SEGMENTS_PER_REQUEST);
    CONST(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    CONST(BLKIF_DISCARD_SECURE);

    CONST(NETTXF_csum_blank);
    CONST(NETTXF_data_validated);
    CONST(NETTXF_more_data);
    CONST(NETTXF_extra_info);
    CONST(NETRXF_data_validated);
    CONST(NETRXF_csum_blank);
    CONST(NETRXF_more_data);
    CONST(NETRXF_extra_info);
    CONST(NETRXF_gso_prefix);
    CONST(XEN_NETIF_EXTRA_TYPE_NONE);
    CONST(XEN_NETIF_EXTRA_TYPE_GSO);
    CONST(XEN_NETIF_EXTRA_TYPE_MCAST_ADD);
    CONST(XEN_NETIF_EXTRA_TYPE_MCAST_DEL);
    CONST(XEN_NETIF_EXTRA_TYPE_HASH);
    CONST(XEN_NETIF_EXTRA_TYPE_MAX);
    CONST(XEN_NETIF_EXTRA_FLAG_MORE);
    CONST(XEN_NETIF_GSO_TYPE_NONE);
    CONST(XEN_NETIF_GSO_TYPE_TCPV4);
    CONST(XEN_NETIF_GSO_TYPE_TCPV6);
    CONST(XEN_NETIF_NR_SLOTS_MIN);
    CONST(XEN_NETIF_MAX_TX_SIZE);
    CONST(NETIF_RSP_DROPPED);
    CONST(NETIF_RSP_ERROR);
    CONST(NETIF_RSP_OKAY);
    CONST(NETIF_RSP_NULL);

    CONST(GTF_permit_access);
    CONST(GTF_readonly);
    CONST(GTF_type_mask);
    CONST(GTF_reading);
    CONST(GTF_writing);
    CONST(GTF_PWT);
    CONST(GTF_PCD);
    CONST(GTF_PAT);
    CONST(GTF_sub_page);

    RING_SIZE_OF(blkif, XEN_PAGE);
    RING_SIZE_OF(blkif, 2 * XEN_PAGE);
    /* 7 pages: exactly 256 entries without the header, 128 with it. */
    RING_SIZE_OF(blkif, 7 * XEN_PAGE);
    RING_SIZE_OF(blkif, 16 * XEN_PAGE);
    RING_SIZE_OF(netif_tx, XEN_PAGE);
    RING_SIZE_OF(netif_rx, XEN_PAGE);
}

/* ------------------------------------------------------ shared test data */

static void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fail ", stdout);
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
    fflush(stdout);
    exit(1);
}

static uint64_t request_id(uint32_t s) { return 0xFEED000000000000ull | ((uint64_t)s << 16) | 0x1234; }
static uint64_t request_sector(uint32_t s) { return 0x0000010000000000ull + (uint64_t)s * 8; }
static uint16_t request_handle(uint32_t s) { return (uint16_t)(0xA000u | (s & 0xFFFu)); }
static uint64_t discard_sectors(uint32_t s) { return 0x100000000ull + (uint64_t)s * 16; }

static int16_t response_status(uint32_t s)
{
    switch (s % 3) {
    case 1: return BLKIF_RSP_ERROR;
    case 2: return BLKIF_RSP_EOPNOTSUPP;
    default: return BLKIF_RSP_OKAY;
    }
}

/*
 * Request number s, as a full 112-byte slot: every padding byte zero.
 * s % 6: 0 read, 1 write, 2 discard, 3 indirect, 4 write, 5 flush.
 */
static void make_request(uint32_t s, blkif_request_t *out)
{
    memset(out, 0, sizeof(*out));
    switch (s % 6) {
    case 2: {
        blkif_request_discard_t d;
        memset(&d, 0, sizeof(d));
        d.operation = BLKIF_OP_DISCARD;
        d.flag = (s / 6) % 2 ? BLKIF_DISCARD_SECURE : 0;
        d.handle = request_handle(s);
        d.id = request_id(s);
        d.sector_number = request_sector(s);
        d.nr_sectors = discard_sectors(s);
        memcpy(out, &d, sizeof(d));
        return;
    }
    case 3: {
        blkif_request_indirect_t ind;
        memset(&ind, 0, sizeof(ind));
        ind.operation = BLKIF_OP_INDIRECT;
        ind.indirect_op = (s / 6) % 2 ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        ind.nr_segments = (uint16_t)(100 + s % 400);
        ind.id = request_id(s);
        ind.sector_number = request_sector(s);
        ind.handle = request_handle(s);
        for (uint32_t i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            ind.indirect_grefs[i] = 0x40000000u | (s << 4) | i;
        memcpy(out, &ind, sizeof(ind));
        return;
    }
    default: {
        static const uint8_t ops[6] = {BLKIF_OP_READ, BLKIF_OP_WRITE, 0, 0,
                                       BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE};
        out->operation = ops[s % 6];
        out->nr_segments = out->operation == BLKIF_OP_FLUSH_DISKCACHE ? 0 : (uint8_t)(1 + s % 11);
        out->handle = request_handle(s);
        out->id = request_id(s);
        out->sector_number = request_sector(s);
        for (uint32_t i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            out->seg[i].gref = 0x80000000u | (s << 8) | i;
            out->seg[i].first_sect = (uint8_t)(i % 8);
            out->seg[i].last_sect = 7;
        }
        return;
    }
    }
}

static void make_response(uint32_t s, blkif_response_t *out)
{
    blkif_request_t req;
    make_request(s, &req);
    memset(out, 0, sizeof(*out));
    out->id = request_id(s);
    out->operation = req.operation;
    out->status = response_status(s);
}

#define CHECK(s, what, got, want)                                                  \
    do {                                                                           \
        unsigned long long got_ = (unsigned long long)(got);                       \
        unsigned long long want_ = (unsigned long long)(want);                     \
        if (got_ != want_)                                                         \
            fail("%s %u: %s is %#llx, expected %#llx", kind, (s), (what), got_, want_); \
    } while (0)

static void check_bytes(const char *kind, uint32_t s, const void *got, const void *want, size_t n)
{
    const uint8_t *g = got, *w = want;
    for (size_t i = 0; i < n; i++)
        if (g[i] != w[i])
            fail("%s %u: byte %zu is %#x, expected %#x", kind, s, i, g[i], w[i]);
}

/* Field by field through the header's own views, then every byte. */
static void check_request(uint32_t s, const blkif_request_t *got)
{
    const char *kind = "request";
    blkif_request_t want;
    make_request(s, &want);
    CHECK(s, "operation", got->operation, want.operation);
    if (got->operation == BLKIF_OP_DISCARD) {
        blkif_request_discard_t g, w;
        memcpy(&g, got, sizeof(g));
        memcpy(&w, &want, sizeof(w));
        CHECK(s, "discard.flag", g.flag, w.flag);
        CHECK(s, "discard.handle", g.handle, w.handle);
        CHECK(s, "discard.id", g.id, w.id);
        CHECK(s, "discard.sector_number", g.sector_number, w.sector_number);
        CHECK(s, "discard.nr_sectors", g.nr_sectors, w.nr_sectors);
    } else if (got->operation == BLKIF_OP_INDIRECT) {
        blkif_request_indirect_t g, w;
        memcpy(&g, got, sizeof(g));
        memcpy(&w, &want, sizeof(w));
        CHECK(s, "indirect.indirect_op", g.indirect_op, w.indirect_op);
        CHECK(s, "indirect.nr_segments", g.nr_segments, w.nr_segments);
        CHECK(s, "indirect.id", g.id, w.id);
        CHECK(s, "indirect.sector_number", g.sector_number, w.sector_number);
        CHECK(s, "indirect.handle", g.handle, w.handle);
        for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            CHECK(s, "indirect.indirect_grefs[i]", g.indirect_grefs[i], w.indirect_grefs[i]);
    } else {
        CHECK(s, "nr_segments", got->nr_segments, want.nr_segments);
        CHECK(s, "handle", got->handle, want.handle);
        CHECK(s, "id", got->id, want.id);
        CHECK(s, "sector_number", got->sector_number, want.sector_number);
        for (int i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            CHECK(s, "seg[i].gref", got->seg[i].gref, want.seg[i].gref);
            CHECK(s, "seg[i].first_sect", got->seg[i].first_sect, want.seg[i].first_sect);
            CHECK(s, "seg[i].last_sect", got->seg[i].last_sect, want.seg[i].last_sect);
        }
    }
    check_bytes(kind, s, got, &want, sizeof(want));
}

static void check_response(uint32_t s, const blkif_response_t *got)
{
    const char *kind = "response";
    blkif_response_t want;
    make_response(s, &want);
    CHECK(s, "id", got->id, want.id);
    CHECK(s, "operation", got->operation, want.operation);
    CHECK(s, "status", (long long)got->status, (long long)want.status);
    check_bytes(kind, s, got, &want, sizeof(want));
}

/*
 * What the real *_AND_CHECK_NOTIFY macros decide for a push by the other
 * side that moved the producer index from old to new while the event index
 * was event: the macro itself, run on a private copy of the header.
 */
static int request_push_notifies(RING_IDX old, RING_IDX new, RING_IDX event)
{
    struct blkif_sring copy;
    blkif_front_ring_t r;
    int notify;
    memset(&copy, 0, sizeof(copy));
    copy.req_prod = old;
    copy.req_event = event;
    r.sring = &copy;
    r.req_prod_pvt = new;
    r.rsp_cons = old;
    r.nr_ents = 1;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&r, notify);
    return notify;
}

static int response_push_notifies(RING_IDX old, RING_IDX new, RING_IDX event)
{
    struct blkif_sring copy;
    blkif_back_ring_t r;
    int notify;
    memset(&copy, 0, sizeof(copy));
    copy.rsp_prod = old;
    copy.rsp_event = event;
    r.sring = &copy;
    r.rsp_prod_pvt = new;
    r.req_cons = new;
    r.nr_ents = 1;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&r, notify);
    return notify;
}

/* ----------------------------------------------------------- ring halves */

struct mapping {
    void *base;
    size_t len;
};

/* Maps FRAMES of memfd FD side by side: the ring as one contiguous block. */
static struct mapping map_ring(const char *fd_arg, const char *frames_arg)
{
    struct mapping m;
    unsigned long frames[MAX_FRAMES];
    size_t n = 0;
    char *end;
    int fd = (int)strtol(fd_arg, &end, 10);
    if (*end != '\0')
        fail("bad fd argument %s", fd_arg);
    for (const char *p = frames_arg;; p = end + 1) {
        if (n == MAX_FRAMES)
            fail("too many frames in %s", frames_arg);
        frames[n++] = strtoul(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0'))
            fail("bad frame list %s", frames_arg);
        if (*end == '\0')
            break;
    }
    m.len = n * XEN_PAGE;
    m.base = mmap(NULL, m.len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m.base == MAP_FAILED)
        fail("reserve %zu bytes: %s", m.len, strerror(errno));
    for (size_t i = 0; i < n; i++) {
        void *at = (char *)m.base + i * XEN_PAGE;
        void *got = mmap(at, XEN_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                         (off_t)(frames[i] * XEN_PAGE));
        if (got != at)
            fail("mmap frame %lu of fd %d: %s", frames[i], fd, strerror(errno));
    }
    close(fd);
    return m;
}

/* Next command line, without its newline; NULL at end of input. */
static char *next_command(char *buf, size_t len)
{
    if (!fgets(buf, (int)len, stdin))
        return NULL;
    buf[strcspn(buf, "\n")] = '\0';
    return buf;
}

static unsigned arg_u(const char *cmd, const char *name)
{
    unsigned v;
    if (sscanf(cmd + strlen(name), " %u", &v) != 1)
        fail("bad command: %s", cmd);
    return v;
}

static int is(const char *cmd, const char *name)
{
    size_t n = strlen(name);
    return strncmp(cmd, name, n) == 0 && (cmd[n] == '\0' || cmd[n] == ' ');
}

/*
 *   push K        queue requests, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
 *                 -> "pushed <req_prod> <notify>"
 *   rsp_pushed    the peer has just pushed responses
 *                 -> "notify <what the macro decides for that push>"
 *   collect ARM   take every response; with ARM, RING_FINAL_CHECK_FOR_RESPONSES
 *                 -> "collected <count>"
 *   quit          -> "bye <req_prod_pvt> <rsp_cons>"
 */
static int run_front(const char *fd_arg, const char *frames_arg)
{
    struct mapping m = map_ring(fd_arg, frames_arg);
    blkif_sring_t *sring = m.base;
    blkif_front_ring_t front;
    uint32_t next_request = 0, next_response = 0;
    RING_IDX seen_rsp_prod = 0;
    char line[128], *cmd;

    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, m.len);
    printf("ready %u\n", RING_SIZE(&front));
    fflush(stdout);

    while ((cmd = next_command(line, sizeof(line)))) {
        if (is(cmd, "push")) {
            unsigned k = arg_u(cmd, "push");
            int notify;
            for (unsigned i = 0; i < k; i++) {
                blkif_request_t req;
                if (RING_FULL(&front))
                    fail("ring full at request %u", next_request);
                make_request(next_request++, &req);
                memcpy(RING_GET_REQUEST(&front, front.req_prod_pvt), &req, sizeof(req));
                front.req_prod_pvt++;
            }
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
            printf("pushed %u %d\n", sring->req_prod, notify);
        } else if (is(cmd, "rsp_pushed")) {
            RING_IDX prod = sring->rsp_prod;
            printf("notify %d\n", response_push_notifies(seen_rsp_prod, prod, sring->rsp_event));
            seen_rsp_prod = prod;
        } else if (is(cmd, "collect")) {
            unsigned arm = arg_u(cmd, "collect"), n = 0;
            int more;
            do {
                RING_IDX rp = sring->rsp_prod;
                if (RING_RESPONSE_PROD_OVERFLOW(&front, rp))
                    fail("rsp_prod %u overflows rsp_cons %u", rp, front.rsp_cons);
                xen_rmb(); /* responses are read after rsp_prod */
                for (; front.rsp_cons != rp; front.rsp_cons++, n++)
                    check_response(next_response++, RING_GET_RESPONSE(&front, front.rsp_cons));
                if (!arm)
                    break;
                RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
            } while (more);
            printf("collected %u\n", n);
        } else if (is(cmd, "quit")) {
            printf("bye %u %u\n", front.req_prod_pvt, front.rsp_cons);
            return 0;
        } else {
            fail("unknown command: %s", cmd);
        }
        fflush(stdout);
    }
    return 1;
}

/*
 *   req_pushed    the peer has just pushed requests
 *                 -> "notify <what the macro decides for that push>"
 *   consume ARM   RING_COPY_REQUEST every request; with ARM,
 *                 RING_FINAL_CHECK_FOR_REQUESTS -> "consumed <count>"
 *   respond K     answer the K oldest consumed requests,
 *                 RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
 *                 -> "pushed <rsp_prod> <notify>"
 *   quit          -> "bye <req_cons> <rsp_prod_pvt>"
 */
static int run_back(const char *fd_arg, const char *frames_arg)
{
    struct mapping m = map_ring(fd_arg, frames_arg);
    blkif_sring_t *sring = m.base;
    blkif_back_ring_t back;
    uint32_t next_request = 0, next_response = 0;
    RING_IDX seen_req_prod = 0;
    char line[128], *cmd;

    BACK_RING_INIT(&back, sring, m.len);
    printf("ready %u\n", RING_SIZE(&back));
    fflush(stdout);

    while ((cmd = next_command(line, sizeof(line)))) {
        if (is(cmd, "req_pushed")) {
            RING_IDX prod = sring->req_prod;
            printf("notify %d\n", request_push_notifies(seen_req_prod, prod, sring->req_event));
            seen_req_prod = prod;
        } else if (is(cmd, "consume")) {
            unsigned arm = arg_u(cmd, "consume"), n = 0;
            int more;
            do {
                RING_IDX rp = sring->req_prod;
                if (RING_REQUEST_PROD_OVERFLOW(&back, rp))
                    fail("req_prod %u overflows rsp_prod_pvt %u", rp, back.rsp_prod_pvt);
                xen_rmb(); /* requests are read after req_prod */
                for (; back.req_cons != rp; back.req_cons++, n++) {
                    blkif_request_t req;
                    if (RING_REQUEST_CONS_OVERFLOW(&back, back.req_cons))
                        fail("req_cons %u overflows", back.req_cons);
                    RING_COPY_REQUEST(&back, back.req_cons, &req);
                    check_request(next_request++, &req);
                }
                if (!arm)
                    break;
                RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
            } while (more);
            printf("consumed %u\n", n);
        } else if (is(cmd, "respond")) {
            unsigned k = arg_u(cmd, "respond");
            int notify;
            for (unsigned i = 0; i < k; i++) {
                blkif_response_t rsp;
                if (back.rsp_prod_pvt == back.req_cons)
                    fail("no consumed request left to answer");
                make_response(next_response++, &rsp);
                memcpy(RING_GET_RESPONSE(&back, back.rsp_prod_pvt), &rsp, sizeof(rsp));
                back.rsp_prod_pvt++;
            }
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
            printf("pushed %u %d\n", sring->rsp_prod, notify);
        } else if (is(cmd, "quit")) {
            printf("bye %u %u\n", back.req_cons, back.rsp_prod_pvt);
            return 0;
        } else {
            fail("unknown command: %s", cmd);
        }
        fflush(stdout);
    }
    return 1;
}

/* ------------------------------------------------------------- netfront */

/*
 * Netif test data, written identically in xen_abi.rs. TX slot s is an
 * extra-info (GSO) slot when s % 7 == 1, a netif_tx_request otherwise; RX
 * response r is an extra-info (GSO) slot when r % 5 == 1, written by the
 * backend into the response slot as netback does.
 */
static int tx_is_extra(uint32_t s) { return s % 7 == 1; }
static int rx_is_extra(uint32_t r) { return r % 5 == 1; }

static void make_gso_extra(uint32_t s, netif_extra_info_t *e)
{
    memset(e, 0, sizeof(*e));
    e->type = XEN_NETIF_EXTRA_TYPE_GSO;
    e->flags = s % 2 ? XEN_NETIF_EXTRA_FLAG_MORE : 0;
    e->u.gso.size = (uint16_t)(1000 + s % 500);
    e->u.gso.type = s % 3 ? XEN_NETIF_GSO_TYPE_TCPV4 : XEN_NETIF_GSO_TYPE_TCPV6;
    e->u.gso.pad = 0;
    e->u.gso.features = (uint16_t)(s % 4);
}

static void make_tx_request(uint32_t s, netif_tx_request_t *out)
{
    memset(out, 0, sizeof(*out));
    if (tx_is_extra(s)) {
        netif_extra_info_t e;
        make_gso_extra(s, &e);
        memcpy(out, &e, sizeof(e));
        return;
    }
    out->gref = 0x70000000u | s;
    out->offset = (uint16_t)((s * 64) % XEN_PAGE);
    out->flags = (uint16_t)((s % 7 == 0 ? NETTXF_extra_info : 0) | (s % 3 == 0 ? NETTXF_more_data : 0) |
                            (s % 2 ? NETTXF_csum_blank | NETTXF_data_validated : 0));
    out->id = (uint16_t)(s * 3);
    out->size = (uint16_t)(14 + s % 1500);
}

static void make_tx_response(uint32_t s, netif_tx_response_t *out)
{
    netif_tx_request_t req;
    make_tx_request(s, &req);
    memset(out, 0, sizeof(*out));
    if (tx_is_extra(s)) {
        out->status = NETIF_RSP_NULL;
        return;
    }
    out->id = req.id;
    switch (s % 4) {
    case 1: out->status = NETIF_RSP_ERROR; break;
    case 2: out->status = NETIF_RSP_DROPPED; break;
    default: out->status = NETIF_RSP_OKAY; break;
    }
}

static void make_rx_request(uint32_t r, netif_rx_request_t *out)
{
    memset(out, 0, sizeof(*out));
    out->id = (uint16_t)(r * 5 + 1);
    out->gref = 0x60000000u | r;
}

static void make_rx_response(uint32_t r, netif_rx_response_t *out)
{
    memset(out, 0, sizeof(*out));
    if (rx_is_extra(r)) {
        netif_extra_info_t e;
        make_gso_extra(r, &e);
        memcpy(out, &e, sizeof(e));
        return;
    }
    out->id = (uint16_t)(r * 5 + 1);
    out->offset = (uint16_t)((r * 16) % XEN_PAGE);
    out->flags = (uint16_t)((r % 3 == 0 ? NETRXF_more_data : 0) |
                            (r % 5 == 0 ? NETRXF_extra_info | NETRXF_csum_blank | NETRXF_data_validated : 0));
    out->status = (int16_t)(1 + r % XEN_PAGE);
}

static void check_tx_response(uint32_t s, const netif_tx_response_t *got)
{
    const char *kind = "tx response";
    netif_tx_response_t want;
    make_tx_response(s, &want);
    CHECK(s, "status", (long long)got->status, (long long)want.status);
    if (want.status != NETIF_RSP_NULL)
        CHECK(s, "id", got->id, want.id);
    check_bytes(kind, s, got, &want, sizeof(want));
}

/* Through the extra-info view where netback writes one, then every byte. */
static void check_rx_response(uint32_t r, const netif_rx_response_t *got)
{
    const char *kind = "rx response";
    netif_rx_response_t want;
    make_rx_response(r, &want);
    if (rx_is_extra(r)) {
        netif_extra_info_t g, w;
        memcpy(&g, got, sizeof(g));
        make_gso_extra(r, &w);
        CHECK(r, "extra.type", g.type, w.type);
        CHECK(r, "extra.flags", g.flags, w.flags);
        CHECK(r, "extra.u.gso.size", g.u.gso.size, w.u.gso.size);
        CHECK(r, "extra.u.gso.type", g.u.gso.type, w.u.gso.type);
        CHECK(r, "extra.u.gso.pad", g.u.gso.pad, w.u.gso.pad);
        CHECK(r, "extra.u.gso.features", g.u.gso.features, w.u.gso.features);
    } else {
        CHECK(r, "id", got->id, want.id);
        CHECK(r, "offset", got->offset, want.offset);
        CHECK(r, "flags", got->flags, want.flags);
        CHECK(r, "status", (long long)got->status, (long long)want.status);
    }
    check_bytes(kind, r, got, &want, sizeof(want));
}

/* Queues k requests made by make(seq) and pushes them; prints the result. */
#define NETFRONT_PUSH(ring, type, make, next, k)                          \
    do {                                                                  \
        int notify_;                                                      \
        for (unsigned i_ = 0; i_ < (k); i_++) {                           \
            type req_;                                                    \
            if (RING_FULL(ring))                                          \
                fail("%s ring full at %u", #ring, (next));                \
            make((next)++, &req_);                                        \
            memcpy(RING_GET_REQUEST(ring, (ring)->req_prod_pvt), &req_,   \
                   sizeof(req_));                                         \
            (ring)->req_prod_pvt++;                                       \
        }                                                                 \
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(ring, notify_);               \
        printf("pushed %u %d\n", (ring)->sring->req_prod, notify_);       \
    } while (0)

/* Takes every published response, checking each with check(seq). */
#define NETFRONT_COLLECT(ring, check, next)                               \
    do {                                                                  \
        unsigned n_ = 0;                                                  \
        RING_IDX rp_ = (ring)->sring->rsp_prod;                           \
        if (RING_RESPONSE_PROD_OVERFLOW(ring, rp_))                       \
            fail("%s rsp_prod %u overflows", #ring, rp_);                 \
        xen_rmb(); /* responses are read after rsp_prod */                \
        for (; (ring)->rsp_cons != rp_; (ring)->rsp_cons++, n_++)         \
            check((next)++, RING_GET_RESPONSE(ring, (ring)->rsp_cons));   \
        printf("collected %u\n", n_);                                     \
    } while (0)

/*
 *   sizes         -> "sizes <tx RING_SIZE> <rx RING_SIZE>"
 *   tx K / rx K   queue K requests, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
 *                 -> "pushed <req_prod> <notify>"
 *   tx_collect / rx_collect
 *                 take every response -> "collected <count>"
 *   quit          -> "bye <tx req_prod_pvt> <tx rsp_cons> <rx req_prod_pvt> <rx rsp_cons>"
 */
static int run_netfront(const char *fd_arg, const char *frames_arg)
{
    struct mapping m = map_ring(fd_arg, frames_arg);
    netif_tx_sring_t *txs = m.base;
    netif_rx_sring_t *rxs = (void *)((char *)m.base + XEN_PAGE);
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    uint32_t tx_req = 0, tx_rsp = 0, rx_req = 0, rx_rsp = 0;
    char line[128], *cmd;

    if (m.len != 2 * XEN_PAGE)
        fail("netfront wants two frames, got %s", frames_arg);
    SHARED_RING_INIT(txs);
    FRONT_RING_INIT(&tx, txs, XEN_PAGE);
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&rx, rxs, XEN_PAGE);
    printf("ready %u\n", RING_SIZE(&tx));
    fflush(stdout);

    while ((cmd = next_command(line, sizeof(line)))) {
        if (is(cmd, "sizes")) {
            printf("sizes %u %u\n", RING_SIZE(&tx), RING_SIZE(&rx));
        } else if (is(cmd, "tx")) {
            unsigned k = arg_u(cmd, "tx");
            NETFRONT_PUSH(&tx, netif_tx_request_t, make_tx_request, tx_req, k);
        } else if (is(cmd, "rx")) {
            unsigned k = arg_u(cmd, "rx");
            NETFRONT_PUSH(&rx, netif_rx_request_t, make_rx_request, rx_req, k);
        } else if (is(cmd, "tx_collect")) {
            NETFRONT_COLLECT(&tx, check_tx_response, tx_rsp);
        } else if (is(cmd, "rx_collect")) {
            NETFRONT_COLLECT(&rx, check_rx_response, rx_rsp);
        } else if (is(cmd, "quit")) {
            printf("bye %u %u %u %u\n", tx.req_prod_pvt, tx.rsp_cons, rx.req_prod_pvt, rx.rsp_cons);
            return 0;
        } else {
            fail("unknown command: %s", cmd);
        }
        fflush(stdout);
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "layout") == 0) {
        print_layout();
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "front") == 0)
        return run_front(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "back") == 0)
        return run_back(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "netfront") == 0)
        return run_netfront(argv[2], argv[3]);
    fprintf(stderr, "usage: %s layout | front FD FRAMES | back FD FRAMES | netfront FD TX,RX\n", argv[0]);
    return 2;
}
