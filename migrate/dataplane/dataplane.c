/* The data plane: page batches between guest memory and streams, in C threads that never
 * hold the GIL (specs/stream-format.md "PAGE_DATA", "PAGE_DATA_ZSTD", "Channel streams";
 * specs/relocation.md "Data channels").
 *
 * Source side: a sender owns worker threads and one or more outputs (a file, or the data
 * channels of a relocation, each a socket with or without TLS). A round hands the workers
 * a list of pfns; each worker takes batches of up to 1024 pfns, finds the all-zero pages,
 * copies the others out of guest memory, compresses them when that pays, frames the
 * record (CRC-32) and appends it to its output, whose XXH3-128 digest and counts follow
 * every byte written. Outputs are shared under a lock; a record is written whole.
 *
 * Destination side: a receiver owns one thread per data channel. Each reads its channel's
 * records, checks everything (framing, CRC, padding, entries, pfn ranges, the zstd frame,
 * its digest at every CHANNEL_SYNC) before it writes a byte of guest memory, and places the
 * pages straight into it. Channels meet at a barrier at the end of every round, so a page
 * of round r+1 never lands before every page of round r has.
 *
 * Every problem with input is one line in the object's error buffer; the first error
 * wins and stops every thread of the object.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <xxhash.h>
#include <zlib.h>
#include <zstd.h>

#define DP_PAGE 4096u
#define DP_MAX_BATCH 1024u
#define DP_INLINE_MAX 256u      /* pages a send encodes and writes on the calling thread */
#define DP_REC_HDR 16u
#define DP_BATCH_HDR 8u
#define DP_ENTRY 16u
#define DP_MAX_RANGES 64u
#define DP_SPACES 2u
#define DP_ALIGN 8u
#define DP_CHANNEL_HDR 48u
#define DP_SYNC_BODY 56u
#define DP_HANDOFF_MSG 16u

#define T_PAGE_DATA 3u
#define T_PAGE_DATA_ZSTD 4u
#define T_CHANNEL_SYNC 0x50u
#define P_NORMAL 0u
#define P_ZERO 1u
#define P_COMPRESSED 2u
#define SYNC_FINAL 1u

#define DP_MODE_RAW 0
#define DP_MODE_ZSTD 1
#define DP_MODE_AUTO 2

/* largest body a page record can have: header, 1024 entries, and a zstd frame of 4 MiB of
 * incompressible pages (a raw batch is smaller) */
#define DP_MAX_PAGE_BODY (DP_BATCH_HDR + DP_ENTRY * DP_MAX_BATCH + ZSTD_COMPRESSBOUND(DP_MAX_BATCH * DP_PAGE))
#define DP_REC_CAP (DP_REC_HDR + DP_MAX_PAGE_BODY + DP_ALIGN)

static const uint8_t CHANNEL_MAGIC[8] = {0x89, 'H', 'V', 'M', 'C', 'H', 'A', 'N'};

static double clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now(void) { return clock_seconds(CLOCK_MONOTONIC); }
/* the calling thread's CPU time: what a computation took, a preemption not counted */
static double cpu_now(void) { return clock_seconds(CLOCK_THREAD_CPUTIME_ID); }

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint32_t padded(uint32_t n) { return (n + DP_ALIGN - 1) & ~(DP_ALIGN - 1); }

#include "../stream/crc32_fold.h"

/* for the tests: the fast CRC against zlib's */
uint32_t dp_crc32(uint32_t crc, const uint8_t *p, size_t len)
{
    return crc32_update(crc, p, len);
}

/* the record's CRC-32 (zlib): type, body_length, reserved as written, then the body */
static uint32_t record_crc(const uint8_t *hdr, const uint8_t *body, uint32_t len)
{
    return crc32_update(crc32_update(0, hdr, 12), body, len);
}

static int page_is_zero(const uint8_t *page)
{
    const uint64_t *w = (const uint64_t *)page;
    uint64_t acc = 0;
    for (unsigned i = 0; i < DP_PAGE / 8; i += 8) {
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}

/* -- errors ------------------------------------------------------------------------- */
struct dp_error {
    pthread_mutex_t lock;
    int failed;
    char text[512];
};

static void set_error(struct dp_error *e, const char *fmt, ...)
{
    pthread_mutex_lock(&e->lock);
    if (!e->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->text, sizeof e->text, fmt, ap);
        va_end(ap);
        for (char *c = e->text; *c; c++)        /* one line, whatever went in */
            if (*c == '\n' || *c == '\r')
                *c = ' ';
        e->failed = 1;
    }
    pthread_mutex_unlock(&e->lock);
}

static int failed(struct dp_error *e)
{
    return __atomic_load_n(&e->failed, __ATOMIC_ACQUIRE);
}

static const char *tls_reason(void)
{
    static __thread char buf[160];
    unsigned long code = ERR_get_error();
    if (!code)
        return "TLS error";
    ERR_error_string_n(code, buf, sizeof buf);
    ERR_clear_error();
    return buf;
}

/* -- connections: a socket or a file, with or without TLS ------------------------------ */
struct dp_conn {
    int fd;
    SSL *ssl;
    uint64_t *carried;          /* if set, bytes read are added to it as they come (atomic) */
};

/* Whether a TLS call's error `err` on a blocking socket is its SO_SNDTIMEO or SO_RCVTIMEO
 * running out: OpenSSL says WANT_READ or WANT_WRITE (either, as a key update may read on a
 * write), or the EAGAIN of a plain socket. Clears OpenSSL's error queue then. */
static int tls_timed_out(int err)
{
    int out = err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ||
              (err == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK));
    if (out)
        ERR_clear_error();
    return out;
}

/* 0, or -1 with errno / a TLS reason in *why */
static int conn_write(struct dp_conn *c, const uint8_t *buf, size_t len, const char **why)
{
    while (len) {
        ssize_t n;
        if (c->ssl) {
            int chunk = len > (1u << 30) ? 1 << 30 : (int)len;
            n = SSL_write(c->ssl, buf, chunk);
            if (n <= 0) {
                int err = SSL_get_error(c->ssl, (int)n);
                if (tls_timed_out(err)) {       /* as a plain write says it */
                    *why = strerror(EAGAIN);
                } else {
                    *why = err == SSL_ERROR_SYSCALL && errno ? strerror(errno) : tls_reason();
                }
                return -1;
            }
        } else {
            n = write(c->fd, buf, len);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                *why = strerror(errno);
                return -1;
            }
        }
        buf += n;
        len -= n;
    }
    return 0;
}

/* 1 when len bytes were read, 0 at a clean end before the first byte, -1 otherwise */
static int conn_read(struct dp_conn *c, uint8_t *buf, size_t len, const char **why)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n;
        if (c->ssl) {
            int chunk = len - got > (1u << 30) ? 1 << 30 : (int)(len - got);
            n = SSL_read(c->ssl, buf + got, chunk);
            if (n <= 0) {
                int err = SSL_get_error(c->ssl, (int)n);
                if (err == SSL_ERROR_ZERO_RETURN && got == 0)
                    return 0;
                if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && errno == 0))
                    *why = "the channel ended inside a record";
                else if (tls_timed_out(err)) {
                    *why = "no data within the channel timeout";
                } else {
                    *why = err == SSL_ERROR_SYSCALL ? strerror(errno) : tls_reason();
                }
                return -1;
            }
        } else {
            n = read(c->fd, buf + got, len - got);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                *why = errno == EAGAIN || errno == EWOULDBLOCK ? "no data within the channel timeout"
                                                                : strerror(errno);
                return -1;
            }
            if (n == 0) {
                if (got == 0)
                    return 0;
                *why = "the channel ended inside a record";
                return -1;
            }
        }
        got += n;
        if (c->carried)
            __atomic_add_fetch(c->carried, (uint64_t)n, __ATOMIC_RELAXED);
    }
    return 1;
}

/* Whether bytes have come that no read has taken yet (any on the socket of a plain
 * channel; on a TLS one, data TLS holds decrypted or that a record on the socket
 * carries); does not wait. */
static int bytes_waiting(struct dp_conn *c)
{
    uint8_t b;
    if (!c->ssl)
        return recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
    if (SSL_pending(c->ssl) > 0)
        return 1;
    /* SSL_pending counts only what was decrypted already: data in a record of its own is
     * still on the socket. A peek decrypts it, with the socket non-blocking meanwhile so
     * that it does not wait (nothing there, or half a record: WANT_READ, and OpenSSL
     * keeps the half for the next read; a close_notify: ZERO_RETURN, no data). */
    int flags = fcntl(c->fd, F_GETFL);
    if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return 0;
    int n = SSL_peek(c->ssl, &b, 1);
    int err = n > 0 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, n);
    fcntl(c->fd, F_SETFL, flags);
    if (n <= 0)
        ERR_clear_error();
    return n > 0 || err == SSL_ERROR_SSL;   /* bytes that are no TLS record count too */
}

/* TLS close_notify if it fits in the socket now, without waiting: a peer that stopped
 * reading could otherwise hold a close for the whole send timeout (each channel's in turn) */
static void close_notify(struct dp_conn *c)
{
    int flags = fcntl(c->fd, F_GETFL);
    if (flags >= 0 && fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) == 0) {
        SSL_shutdown(c->ssl);
        fcntl(c->fd, F_SETFL, flags);
    }
    ERR_clear_error();
}

/* Blocking I/O with timeouts: a socket from Python may be in non-blocking mode (Python
 * implements its socket timeouts that way), which blocking TLS cannot use. */
static void set_blocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && flags & O_NONBLOCK)
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

static void set_timeouts(int fd, double seconds)
{
    struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (time_t)seconds) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* `seconds` from now on `clock` */
static struct timespec deadline_after(clockid_t clock, double seconds)
{
    struct timespec t;
    clock_gettime(clock, &t);
    t.tv_sec += (time_t)seconds;
    t.tv_nsec += (long)((seconds - (time_t)seconds) * 1e9);
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/* A TLS handshake (accept: the server's side) done within `seconds` in all, however the
 * peer spaces its bytes (not above 0, past 1e7, or not a number: no limit): the socket is
 * non-blocking meanwhile and each wait is for what is left, then blocking again. 1 done,
 * 0 out of time, -1 failed (OpenSSL's queue or the verify result say why). */
static int tls_handshake(SSL *ssl, int fd, int accept, double seconds)
{
    int unbounded = !(seconds > 0) || seconds > 1e7;
    double end = now() + (unbounded ? 0 : seconds);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    int rc;
    for (;;) {
        int r = accept ? SSL_accept(ssl) : SSL_connect(ssl);
        if (r == 1) {
            rc = 1;
            break;
        }
        int e = SSL_get_error(ssl, r);
        short want = e == SSL_ERROR_WANT_READ ? POLLIN : e == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
        if (!want) {
            rc = -1;
            break;
        }
        double left = end - now();     /* seconds */
        struct pollfd p = {.fd = fd, .events = want};
        int n = unbounded ? poll(&p, 1, -1) : left > 0 ? poll(&p, 1, left > 1000 ? 1000000 : (int)(left * 1000) + 1) : 0;
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = n < 0 ? -1 : 0;
            break;
        }
    }
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    return rc;
}

/* Why a handshake tls_handshake did not finish (its rc, 0 or -1) failed: into buf */
static const char *handshake_why(SSL *ssl, int rc, double seconds, char *buf, size_t n)
{
    long verify = SSL_get_verify_result(ssl);
    if (rc == 0)
        snprintf(buf, n, "not done within %g s", seconds);
    else
        snprintf(buf, n, "%s", verify != X509_V_OK ? X509_verify_cert_error_string(verify) : tls_reason());
    return buf;
}

/* -- TLS contexts --------------------------------------------------------------------- */
void *dp_tls_context(int server, const char *ca, const char *cert, const char *key,
                     char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        snprintf(err, errlen, "TLS context: %s", tls_reason());
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(err, errlen, "TLS keys: %s", tls_reason());
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY);
    return ctx;
}

void dp_tls_context_free(void *ctx)
{
    SSL_CTX_free(ctx);
}

/* the client side of a channel's TLS handshake; host is checked against the server's
 * certificate (an IP address literal or a DNS name) */
static SSL *tls_connect(SSL_CTX *ctx, int fd, const char *host, double handshake, char *err, size_t errlen)
{
    SSL *ssl = SSL_new(ctx);
    if (!ssl) {
        snprintf(err, errlen, "TLS: %s", tls_reason());
        return NULL;
    }
    X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
    struct in_addr a4;
    struct in6_addr a6;
    int ip = inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
    if (ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1
           : X509_VERIFY_PARAM_set1_host(param, host, 0) != 1 || SSL_set_tlsext_host_name(ssl, host) != 1) {
        snprintf(err, errlen, "TLS: cannot check the name %s", host);
        SSL_free(ssl);
        return NULL;
    }
    SSL_set_fd(ssl, fd);
    int rc = tls_handshake(ssl, fd, 0, handshake);
    if (rc != 1) {
        char why[256];
        snprintf(err, errlen, "TLS handshake failed: %s", handshake_why(ssl, rc, handshake, why, sizeof why));
        SSL_free(ssl);
        return NULL;
    }
    return ssl;
}

/* -- memory: the ranges of an address space ---------------------------------------------- */
struct dp_space {
    uint32_t nranges;
    uint64_t first[DP_MAX_RANGES], count[DP_MAX_RANGES], index[DP_MAX_RANGES];
    uint8_t *base[DP_MAX_RANGES];
    int fd[DP_MAX_RANGES];      /* the memory file behind a range (a memfd), or -1 */
    uint64_t fd_off[DP_MAX_RANGES];
    uint64_t total;             /* pages in all ranges */
    int drop;                   /* destination: check pages, do not place them */
    uint8_t *written;           /* destination: a byte per page, 1 once data was placed */
    uint64_t *seen;             /* channels: a bit per page, pages placed in this round */
};

/* the range holding pfn, or -1 */
static int range_of(const struct dp_space *s, uint64_t pfn)
{
    uint32_t lo = 0, hi = s->nranges;
    while (lo < hi) {           /* the last range starting at or below pfn */
        uint32_t mid = (lo + hi) / 2;
        if (s->first[mid] <= pfn)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || pfn - s->first[lo - 1] >= s->count[lo - 1])
        return -1;
    return (int)lo - 1;
}

/* the page's position among the space's pages, or UINT64_MAX outside every range */
static uint64_t page_index(const struct dp_space *s, uint64_t pfn, uint8_t **addr)
{
    uint32_t lo = 0, hi = s->nranges;
    while (lo < hi) {           /* the last range starting at or below pfn */
        uint32_t mid = (lo + hi) / 2;
        if (s->first[mid] <= pfn)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return UINT64_MAX;
    uint32_t r = lo - 1;
    if (pfn - s->first[r] >= s->count[r])
        return UINT64_MAX;
    if (addr)
        *addr = s->base[r] ? s->base[r] + (pfn - s->first[r]) * DP_PAGE : NULL;
    return s->index[r] + (pfn - s->first[r]);
}

static int space_set(struct dp_space *s, uint32_t n, const uint64_t *first, const uint64_t *count,
                     uint8_t *const *base, const int *fds, const uint64_t *fd_offs, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    if (n > DP_MAX_RANGES) {
        snprintf(err, errlen, "%u memory ranges, at most %u", n, DP_MAX_RANGES);
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (!count[i] || (i && first[i] <= first[i - 1] + count[i - 1])) {
            snprintf(err, errlen, "memory ranges must be ascending and apart");
            return -1;
        }
        s->first[i] = first[i];
        s->count[i] = count[i];
        s->base[i] = base ? base[i] : NULL;
        s->fd[i] = fds ? fds[i] : -1;
        s->fd_off[i] = fd_offs ? fd_offs[i] : 0;
        s->index[i] = s->total;
        s->total += count[i];
    }
    s->nranges = n;
    return 0;
}

/* ======================================================================================
 * Source side
 * ==================================================================================== */
/* a 16-byte handoff message (READY, GO, ANSWER) as it comes, part by part */
struct handoff_msg {
    uint8_t b[DP_HANDOFF_MSG];
    uint32_t have;
};

struct dp_out {
    struct dp_conn conn;
    pthread_mutex_t lock;
    XXH3_state_t *xxh;
    uint64_t records, pages, offset;
    double write_seconds;       /* spent in writes: time the link held us */
    int index, channel, owns_fd;
    struct handoff_msg handoff;     /* READY or ANSWER */
};

/* A stream output over fd: a file, or a connected socket (with host and a TLS client
 * context: the TLS handshake happens here, within `handshake` seconds in all; each later
 * read or write within `timeout`). Returns NULL with err set. */
struct dp_out *dp_out_new(int fd, void *tls_ctx, const char *host, double timeout, double handshake,
                          char *err, size_t errlen)
{
    struct dp_out *o = calloc(1, sizeof *o);
    if (!o) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    o->conn.fd = fd;
    pthread_mutex_init(&o->lock, NULL);
    o->xxh = XXH3_createState();
    if (!o->xxh) {
        snprintf(err, errlen, "out of memory");
        free(o);
        return NULL;
    }
    XXH3_128bits_reset(o->xxh);
    set_blocking(fd);
    if (timeout > 0)
        set_timeouts(fd, timeout);
    if (tls_ctx) {
        o->conn.ssl = tls_connect(tls_ctx, fd, host, handshake, err, errlen);
        if (!o->conn.ssl) {
            XXH3_freeState(o->xxh);
            free(o);
            return NULL;
        }
    }
    return o;
}

void dp_out_free(struct dp_out *o)
{
    if (!o)
        return;
    if (o->conn.ssl) {
        close_notify(&o->conn);
        SSL_free(o->conn.ssl);
    }
    XXH3_freeState(o->xxh);
    pthread_mutex_destroy(&o->lock);
    free(o);
}

/* -- the pacer: a token bucket over every output's bytes ---------------------------------
 * Records are paced in slices of PACE_SLICE bytes, so that a record never runs far ahead
 * of the rate on credit: a round then takes its bytes at the rate, within a slice, which
 * is what the convergence estimate learns from. */
#define PACE_SLICE (256u << 10)

struct dp_pacer {
    pthread_mutex_t lock;
    double rate, burst, tokens, at;
};

static void pace(struct dp_pacer *p, size_t n, volatile int *cancel)
{
    if (!p || p->rate <= 0)
        return;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        double t = now();
        p->tokens += (t - p->at) * p->rate;
        if (p->tokens > p->burst)
            p->tokens = p->burst;
        p->at = t;
        double need = n < p->burst ? n : p->burst;
        if (p->tokens >= need || *cancel) {
            p->tokens -= n;
            pthread_mutex_unlock(&p->lock);
            return;
        }
        double wait = (need - p->tokens) / p->rate;
        pthread_mutex_unlock(&p->lock);
        struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
        if (wait > 0.05)
            ts = (struct timespec){0, 50000000};
        nanosleep(&ts, NULL);
    }
}

/* append a whole record (or the caller's bytes) to the output, paced if `pacer`; the
 * seconds it held the output (writing, or paced) in *held if not NULL */
static int out_append(struct dp_out *o, const uint8_t *buf, size_t len, uint64_t records,
                      uint64_t pages, struct dp_pacer *pacer, volatile int *cancel, const char **why,
                      double *held)
{
    double t0 = now();
    int rc = 0;
    pthread_mutex_lock(&o->lock);
    double got = now();
    for (size_t at = 0; at < len && rc == 0;) {
        size_t piece = pacer && pacer->rate > 0 && len - at > PACE_SLICE ? PACE_SLICE : len - at;
        pace(pacer, piece, cancel);
        rc = conn_write(&o->conn, buf + at, piece, why);
        if (rc == 0)
            XXH3_128bits_update(o->xxh, buf + at, piece);
        at += piece;
        o->offset += rc == 0 ? piece : 0;
    }
    if (rc == 0) {
        o->records += records;
        o->pages += pages;
    }
    double done = now();
    o->write_seconds += done - t0;
    pthread_mutex_unlock(&o->lock);
    if (held)
        *held = done - got;
    return rc;
}

/* Bytes the caller framed itself (the stream header, its records): digested and counted
 * like the rest. 0, or -1 with the reason in err. */
int dp_out_write(struct dp_out *o, const uint8_t *buf, size_t len, uint64_t records, uint64_t pages,
                 char *err, size_t errlen)
{
    const char *why = NULL;
    if (out_append(o, buf, len, records, pages, NULL, NULL, &why, NULL)) {
        snprintf(err, errlen, "writing the stream failed: %s", why);
        return -1;
    }
    return 0;
}

/* records, page entries and bytes so far, and the XXH3-128 digest of those bytes
 * (canonical big-endian form, as END and CHANNEL_SYNC carry it) */
void dp_out_state(struct dp_out *o, uint64_t *records, uint64_t *pages, uint64_t *offset,
                  uint8_t digest[16], double *write_seconds)
{
    pthread_mutex_lock(&o->lock);
    *records = o->records;
    *pages = o->pages;
    *offset = o->offset;
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(o->xxh));
    memcpy(digest, c.digest, 16);
    if (write_seconds)
        *write_seconds = o->write_seconds;
    pthread_mutex_unlock(&o->lock);
}

/* the channel stream header: magic, version, index, the relocation's token */
int dp_out_channel_header(struct dp_out *o, uint32_t version, uint32_t index, const uint8_t token[32],
                          char *err, size_t errlen)
{
    uint8_t hdr[DP_CHANNEL_HDR];
    memcpy(hdr, CHANNEL_MAGIC, 8);
    put32(hdr + 8, version);
    put32(hdr + 12, index);
    memcpy(hdr + 16, token, 32);
    o->channel = 1;
    o->index = index;
    return dp_out_write(o, hdr, sizeof hdr, 0, 0, err, errlen);
}

/* What a CHANNEL_SYNC says of its channel: records, page entries, bytes and digest of
 * everything before it (CHANNELS repeats this of each FINAL one) */
struct dp_sync_info {
    uint64_t records, pages, offset;
    uint8_t digest[16];
};

/* CHANNEL_SYNC: the end of round `round` on this channel (FINAL: the channel's end); what
 * it says in `info` if not NULL */
static int out_sync(struct dp_out *o, uint32_t round, int final, struct dp_sync_info *info,
                    char *err, size_t errlen)
{
    uint8_t rec[DP_REC_HDR + DP_SYNC_BODY];
    uint8_t *b = rec + DP_REC_HDR;
    const char *why = NULL;
    pthread_mutex_lock(&o->lock);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(o->xxh));
    put32(b, round);
    put32(b + 4, final ? SYNC_FINAL : 0);
    put64(b + 8, o->records);
    put64(b + 16, o->pages);
    put64(b + 24, o->offset);
    memcpy(b + 32, c.digest, 16);
    put64(b + 48, 0);
    put32(rec, T_CHANNEL_SYNC);
    put32(rec + 4, DP_SYNC_BODY);
    put32(rec + 8, 0);
    put32(rec + 12, record_crc(rec, b, DP_SYNC_BODY));
    if (info) {
        info->records = o->records;
        info->pages = o->pages;
        info->offset = o->offset;
        memcpy(info->digest, c.digest, 16);
    }
    int rc = conn_write(&o->conn, rec, sizeof rec, &why);
    if (rc == 0) {
        XXH3_128bits_update(o->xxh, rec, sizeof rec);
        o->records += 1;
        o->offset += sizeof rec;
    }
    pthread_mutex_unlock(&o->lock);
    if (rc)
        snprintf(err, errlen, "channel %d: writing CHANNEL_SYNC failed: %s", o->index, why);
    return rc;
}

int dp_out_sync(struct dp_out *o, uint32_t round, int final, char *err, size_t errlen)
{
    return out_sync(o, round, final, NULL, err, errlen);
}

/* -- workers ----------------------------------------------------------------------------- */
struct dp_round_stats {
    uint64_t batches, pages, zero_pages, data_pages, bytes;
    uint64_t zstd_batches, raw_batches, zstd_in, zstd_out;
    double seconds, encode_seconds, write_seconds;
};

struct dp_sender;

struct dp_worker {
    struct dp_sender *s;
    int index;
    pthread_t thread;
    ZSTD_CCtx *cctx;
    uint8_t *gather;            /* one batch's data pages */
    uint8_t *rec;               /* one framed record */
    uint64_t gen;               /* the job generation this worker last finished */
    /* auto mode: what compressing costs and gains here, learned from the batches so far */
    double zstd_rate;           /* input bytes per CPU second of zstd on this worker (EWMA; 0: unknown) */
    double zstd_ratio;          /* output / input (EWMA) */
    double link_rate;           /* bytes per second its output took raw records at while this
                                 * worker wrote (EWMA; 0: unknown), the wait for another
                                 * worker's write not counted */
    int raw_writes;             /* raw records with data it learned link_rate from */
    int since_probe;            /* batches sent raw since zstd was last measured */
    int since_raw;              /* batches sent compressed since the last raw one */
    int sent_raw;               /* the batch just encoded goes raw and carries data */
    struct dp_round_stats st;
};

struct dp_sender {
    struct dp_out **outs;
    int nouts, nworkers, stop;
    struct dp_worker *workers;
    struct dp_space spaces[DP_SPACES];
    pthread_mutex_t lock;
    pthread_cond_t start_cv, done_cv;
    uint64_t gen;               /* bumped for each job */
    int running;                /* workers still on the current job */
    /* the current job */
    uint32_t space;
    const uint64_t *pfns;
    uint64_t npfns, next;       /* next: the first pfn no worker has taken yet (atomic) */
    uint32_t chunk;             /* pages a worker takes at a time (a batch), at most DP_MAX_BATCH */
    int mode, level, stable;
    volatile int cancel;
    struct dp_pacer pacer;
    struct dp_error err;
};

/* an average that gives each new sample `weight` (the first is taken as it is) */
static void learn(double *avg, double sample, double weight)
{
    *avg = *avg == 0 ? sample : (1 - weight) * *avg + weight * sample;
}

#define LEARN 0.25              /* the weight of a new sample in the rates the sender learns */

/* Auto mode: compress a batch when that gets the pages out sooner. k workers share an
 * output that takes L bytes per second (k = workers per output; L as measured while a
 * worker writes raw records, pacing included, capped at the pacer's share). Sent raw, the output
 * is the limit: L. Compressed, a worker's batch of b bytes takes b/C to compress (C: zstd's
 * rate on one worker's core, timed in CPU time so that a preemption does not count) and
 * b*r/L to write (r: the ratio), so k workers take in k / (1/C + r/L) while the output
 * allows L/r; that beats L when C * (k - r) > L. The worker learns C and r from what it
 * compresses, and, while it sends raw, from a probe: AUTO_SAMPLE of the batch's pages
 * compressed and thrown away, at its first batch (after one untimed run that warms the
 * compressor) and every AUTO_PROBE raw batches after (memory changes). A batch is
 * compressed only once L is known and while the ratio learned is below AUTO_SHRINK, and
 * sent compressed only if it shrinks that much.
 *
 * L comes from raw writes alone: a compressed record (a fraction of a batch) drops into
 * an empty socket buffer at once, and its rate said nothing of the link, so compressed
 * and raw batches took turns on a slow TCP link. It starts as the larger of a worker's
 * first two raw writes (the first into an empty buffer is too fast, a preempted one too
 * slow, and too fast corrects itself while it sends raw, too slow only at the next raw
 * batch), and while a worker compresses, every AUTO_PROBE-th batch goes raw to measure
 * it again. */
#define AUTO_PROBE 32
#define AUTO_SAMPLE 128u
#define AUTO_SHRINK 0.875       /* a batch goes compressed only below this ratio */
static int auto_compress(struct dp_worker *w)
{
    struct dp_sender *s = w->s;
    if (w->zstd_rate == 0 || w->raw_writes < 2 || w->since_raw >= AUTO_PROBE)
        return 0;
    double link = w->link_rate;
    if (s->pacer.rate > 0 && s->pacer.rate / s->nouts < link)
        link = s->pacer.rate / s->nouts;
    double k = (double)s->nworkers / s->nouts;
    return w->zstd_ratio < AUTO_SHRINK && w->zstd_rate * (k - w->zstd_ratio) > link;
}

/* zstd of `raw` bytes at in into out (room for ZSTD_compressBound), timed in CPU time:
 * the worker learns C and r from it. Its size, or a zstd error code. */
static size_t zstd_learning(struct dp_worker *w, uint8_t *out, const uint8_t *in, size_t raw)
{
    double t0 = cpu_now();
    size_t z = ZSTD_compressCCtx(w->cctx, out, ZSTD_compressBound(raw), in, raw, w->s->level);
    if (ZSTD_isError(z))
        return z;
    learn(&w->zstd_rate, raw / (cpu_now() - t0 + 1e-9), LEARN);
    learn(&w->zstd_ratio, (double)z / raw, LEARN);
    w->since_probe = 0;
    return z;
}

/* Auto mode, sending raw: learn C and r from AUTO_SAMPLE of the `ndata` pages at src,
 * spread over them, compressed into `scratch` (room for ZSTD_compressBound of them) */
static void auto_probe(struct dp_worker *w, const uint8_t *const *src, uint32_t ndata, uint8_t *scratch)
{
    uint32_t m = ndata < AUTO_SAMPLE ? ndata : AUTO_SAMPLE;
    for (uint32_t i = 0; i < m; i++)
        memcpy(w->gather + (size_t)i * DP_PAGE, src[(uint64_t)i * ndata / m], DP_PAGE);
    size_t raw = (size_t)m * DP_PAGE;
    if (w->zstd_rate == 0)
        ZSTD_compressCCtx(w->cctx, scratch, ZSTD_compressBound(raw), w->gather, raw, w->s->level);
    zstd_learning(w, scratch, w->gather, raw);      /* an error: the batch goes raw all the same */
}

/* One batch of pfns[0..n): entries, data, the record framed in w->rec. Returns the
 * record's length, or 0 after set_error. */
static size_t encode_batch(struct dp_worker *w, const uint64_t *pfns, uint32_t n)
{
    struct dp_sender *s = w->s;
    const struct dp_space *sp = &s->spaces[s->space];
    uint8_t *body = w->rec + DP_REC_HDR;
    uint8_t *entries = body + DP_BATCH_HDR;
    uint8_t *data = entries + DP_ENTRY * n;
    const uint8_t *src[DP_MAX_BATCH];
    uint32_t ndata = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *addr;
        if (page_index(sp, pfns[i], &addr) == UINT64_MAX || !addr) {
            set_error(&s->err, "pfn 0x%llx is outside the memory of space %u", (unsigned long long)pfns[i], s->space);
            return 0;
        }
        int zero = page_is_zero(addr);
        put64(entries + DP_ENTRY * i, pfns[i]);
        put32(entries + DP_ENTRY * i + 8, zero ? P_ZERO : P_NORMAL);
        put32(entries + DP_ENTRY * i + 12, 0);
        if (!zero)
            src[ndata++] = addr;
    }
    size_t raw = (size_t)ndata * DP_PAGE;
    if (ndata && s->mode == DP_MODE_AUTO && (w->zstd_rate == 0 || w->since_probe >= AUTO_PROBE))
        auto_probe(w, src, ndata, data);
    int try_zstd = ndata && (s->mode == DP_MODE_ZSTD || (s->mode == DP_MODE_AUTO && auto_compress(w)));
    uint32_t type = T_PAGE_DATA;
    size_t datalen = raw;
    if (try_zstd) {
        /* gather the pages (a running guest may change them: never compress in place),
         * compress into the record */
        const uint8_t *in = w->gather;
        int contiguous = s->stable;
        for (uint32_t i = 1; contiguous && i < ndata; i++)
            contiguous = src[i] == src[i - 1] + DP_PAGE;
        if (contiguous)
            in = src[0];
        else
            for (uint32_t i = 0; i < ndata; i++)
                memcpy(w->gather + (size_t)i * DP_PAGE, src[i], DP_PAGE);
        size_t z = zstd_learning(w, data, in, raw);
        if (ZSTD_isError(z)) {
            set_error(&s->err, "zstd: %s", ZSTD_getErrorName(z));
            return 0;
        }
        w->st.zstd_in += raw;
        w->st.zstd_out += z;
        if (s->mode == DP_MODE_ZSTD || z < raw * AUTO_SHRINK) {     /* auto: only if it shrinks */
            w->since_raw++;
            type = T_PAGE_DATA_ZSTD;
            datalen = z;
            for (uint32_t i = 0; i < n; i++)
                if (get32(entries + DP_ENTRY * i + 8) == P_NORMAL)
                    put32(entries + DP_ENTRY * i + 8, P_COMPRESSED);
        } else {
            memcpy(data, in, raw);
        }
    } else {
        w->since_probe++;
        for (uint32_t i = 0; i < ndata; i++)
            memcpy(data + (size_t)i * DP_PAGE, src[i], DP_PAGE);
    }
    w->sent_raw = ndata && type == T_PAGE_DATA;
    if (w->sent_raw)
        w->since_raw = 0;
    if (type == T_PAGE_DATA_ZSTD)
        w->st.zstd_batches++;
    else
        w->st.raw_batches++;
    put32(body, s->space);
    put32(body + 4, n);
    uint32_t len = DP_BATCH_HDR + DP_ENTRY * n + (uint32_t)datalen;
    put32(w->rec, type);
    put32(w->rec + 4, len);
    put32(w->rec + 8, 0);
    put32(w->rec + 12, record_crc(w->rec, body, len));
    memset(body + len, 0, padded(len) - len);
    w->st.batches++;
    w->st.pages += n;
    w->st.zero_pages += n - ndata;
    w->st.data_pages += ndata;
    return DP_REC_HDR + padded(len);
}

static void run_job(struct dp_worker *w)
{
    struct dp_sender *s = w->s;
    struct dp_out *out = s->outs[w->index % s->nouts];
    memset(&w->st, 0, sizeof w->st);
    for (;;) {
        if (s->cancel || failed(&s->err))
            return;
        uint64_t at = __atomic_fetch_add(&s->next, s->chunk, __ATOMIC_RELAXED);
        if (at >= s->npfns)
            return;
        uint32_t n = s->npfns - at < s->chunk ? (uint32_t)(s->npfns - at) : s->chunk;
        double t0 = now();
        size_t len = encode_batch(w, s->pfns + at, n);
        w->st.encode_seconds += now() - t0;
        if (!len)
            return;
        const char *why = NULL;
        double held = 0;
        t0 = now();
        if (out_append(out, w->rec, len, 1, n, &s->pacer, &s->cancel, &why, &held)) {
            set_error(&s->err, "%s %d: writing failed: %s", out->channel ? "channel" : "stream",
                      out->index, why);
            return;
        }
        double took = now() - t0;
        w->st.write_seconds += took;
        if (w->sent_raw) {          /* L from raw records alone: see auto_compress */
            double rate = len / (held + 1e-9);
            if (w->raw_writes++ < 2)
                w->link_rate = rate > w->link_rate ? rate : w->link_rate;
            else
                learn(&w->link_rate, rate, 0.5);       /* faster than the others: see auto_compress */
        }
        w->st.bytes += len;
    }
}

static void *worker_main(void *arg)
{
    struct dp_worker *w = arg;
    struct dp_sender *s = w->s;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->stop && w->gen == s->gen)
            pthread_cond_wait(&s->start_cv, &s->lock);
        if (s->stop)
            break;
        w->gen = s->gen;
        pthread_mutex_unlock(&s->lock);
        run_job(w);
        pthread_mutex_lock(&s->lock);
        if (--s->running == 0)
            pthread_cond_broadcast(&s->done_cv);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

void dp_sender_free(struct dp_sender *s);

/* A sender with nworkers threads writing to outs[worker % nouts]; the memory of each space
 * as ranges (first pfn, pages, host address). rate: bytes per second over all outputs (0:
 * unpaced). */
struct dp_sender *dp_sender_new(struct dp_out **outs, int nouts, int nworkers, double rate,
                                char *err, size_t errlen)
{
    if (nouts < 1 || nworkers < 1 || nworkers > 64) {
        snprintf(err, errlen, "a sender needs 1..64 workers and at least one output");
        return NULL;
    }
    struct dp_sender *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->outs = calloc(nouts, sizeof *s->outs);
    s->workers = calloc(nworkers, sizeof *s->workers);
    if (!s->outs || !s->workers) {
        free(s->outs);
        free(s->workers);
        free(s);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    memcpy(s->outs, outs, nouts * sizeof *outs);
    s->nouts = nouts;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->err.lock, NULL);
    pthread_mutex_init(&s->pacer.lock, NULL);
    pthread_cond_init(&s->start_cv, NULL);
    pthread_cond_init(&s->done_cv, NULL);
    s->pacer.rate = rate;
    s->pacer.burst = rate > 0 ? (rate / 50 > PACE_SLICE ? rate / 50 : PACE_SLICE) : 0;
    s->pacer.tokens = s->pacer.burst;
    s->pacer.at = now();
    for (int i = 0; i < nworkers; i++) {
        struct dp_worker *w = &s->workers[i];
        w->s = s;
        w->index = i;
        w->cctx = ZSTD_createCCtx();
        w->gather = malloc(DP_MAX_BATCH * DP_PAGE);
        w->rec = malloc(DP_REC_CAP);
        if (!w->cctx || !w->gather || !w->rec || pthread_create(&w->thread, NULL, worker_main, w)) {
            snprintf(err, errlen, "cannot start a data plane worker");
            s->nworkers = i;
            ZSTD_freeCCtx(w->cctx);
            free(w->gather);
            free(w->rec);
            dp_sender_free(s);
            return NULL;
        }
        s->nworkers = i + 1;
    }
    return s;
}

int dp_sender_set_space(struct dp_sender *s, uint32_t space, uint32_t n, const uint64_t *first,
                        const uint64_t *count, uint8_t *const *base, char *err, size_t errlen)
{
    if (space >= DP_SPACES) {
        snprintf(err, errlen, "unknown space %u", space);
        return -1;
    }
    return space_set(&s->spaces[space], n, first, count, base, NULL, NULL, err, errlen);
}

void dp_sender_set_rate(struct dp_sender *s, double rate)
{
    pthread_mutex_lock(&s->pacer.lock);
    s->pacer.rate = rate;
    s->pacer.burst = rate > 0 ? (rate / 50 > PACE_SLICE ? rate / 50 : PACE_SLICE) : 0;
    s->pacer.tokens = s->pacer.burst;
    s->pacer.at = now();
    pthread_mutex_unlock(&s->pacer.lock);
}

/* The pages pfns[0..n) of `space` with the job's mode, level and stability set; adds the
 * workers' figures to `st`. The caller holds s->lock (released while the job runs). */
static void send_space(struct dp_sender *s, uint32_t space, const uint64_t *pfns, uint64_t n,
                       struct dp_round_stats *st)
{
    /* A small set (the final round of an idle guest) is encoded and written on the
     * calling thread, with worker 0's buffers while it is parked: waking every worker and
     * waiting for each to be scheduled cost more than the work. A larger one is shared
     * out in batches of at most DP_MAX_BATCH pages, and at least one batch per worker, so
     * that a set of a few batches (a flat-out guest's final round) goes out on every
     * channel side by side instead of in one or two batches on one or two of them. */
    int inline_job = n <= DP_INLINE_MAX;
    uint64_t share = (n + (uint64_t)s->nworkers - 1) / (uint64_t)s->nworkers;
    s->space = space;
    s->pfns = pfns;
    s->npfns = n;
    s->next = 0;
    s->chunk = inline_job || share >= DP_MAX_BATCH ? DP_MAX_BATCH : (uint32_t)share;
    if (inline_job) {
        pthread_mutex_unlock(&s->lock);
        run_job(&s->workers[0]);
        pthread_mutex_lock(&s->lock);
    } else {
        s->running = s->nworkers;
        s->gen++;
        pthread_cond_broadcast(&s->start_cv);
        while (s->running)
            pthread_cond_wait(&s->done_cv, &s->lock);
    }
    s->pfns = NULL;
    for (int i = 0; i < (inline_job ? 1 : s->nworkers); i++) {
        struct dp_round_stats *w = &s->workers[i].st;
        st->batches += w->batches;
        st->pages += w->pages;
        st->zero_pages += w->zero_pages;
        st->data_pages += w->data_pages;
        st->bytes += w->bytes;
        st->zstd_batches += w->zstd_batches;
        st->raw_batches += w->raw_batches;
        st->zstd_in += w->zstd_in;
        st->zstd_out += w->zstd_out;
        st->encode_seconds += w->encode_seconds;
        st->write_seconds += w->write_seconds;
    }
}

/* Send the pages of `nspaces` spaces, space spaces[i] its pfns[i][0..counts[i]) (each page
 * once: the caller's round), one space after the other, compressed per `mode` (0 raw, 1
 * zstd at `level`, 2 auto); `stable`: memory cannot change meanwhile (the guest is
 * paused). Then, if sync >= 0, end round `sync` on every output with a CHANNEL_SYNC (FINAL
 * if `final`), each one's figures in synced[output] if not NULL: one call for a whole
 * round, which is what the pause's last round wants. Blocks until everything is written
 * or the sender fails or is cancelled; fills `st`. 0, or -1 with the reason in err
 * (cancelled: "cancelled"). */
int dp_sender_round(struct dp_sender *s, uint32_t nspaces, const uint32_t *spaces,
                    const uint64_t *const *pfns, const uint64_t *counts, int mode, int level, int stable,
                    int64_t sync, int final, struct dp_round_stats *st, struct dp_sync_info *synced,
                    char *err, size_t errlen)
{
    double t0 = now();
    memset(st, 0, sizeof *st);
    if (mode < 0 || mode > 2 || sync > UINT32_MAX) {
        snprintf(err, errlen, "bad mode or round");
        return -1;
    }
    for (uint32_t i = 0; i < nspaces; i++)
        if (spaces[i] >= DP_SPACES) {
            snprintf(err, errlen, "unknown space %u", spaces[i]);
            return -1;
        }
    pthread_mutex_lock(&s->lock);
    s->mode = mode;
    s->level = level;
    s->stable = stable;
    for (uint32_t i = 0; i < nspaces && !s->cancel && !failed(&s->err); i++)
        if (counts[i])
            send_space(s, spaces[i], pfns[i], counts[i], st);
    pthread_mutex_unlock(&s->lock);
    if (failed(&s->err)) {
        snprintf(err, errlen, "%s", s->err.text);
        return -1;
    }
    if (s->cancel) {
        snprintf(err, errlen, "cancelled");
        return -1;
    }
    for (int i = 0; sync >= 0 && i < s->nouts; i++)
        if (out_sync(s->outs[i], (uint32_t)sync, final, synced ? &synced[i] : NULL, err, errlen)) {
            set_error(&s->err, "%s", err);      /* a sync may be half written: nothing more goes */
            return -1;
        }
    st->seconds = now() - t0;
    return 0;
}

/* Stop a send in progress (from any thread); the sender is unusable afterwards. Blocked
 * writes on sockets are woken by shutting the sockets down. */
void dp_sender_cancel(struct dp_sender *s, int shutdown_sockets)
{
    s->cancel = 1;
    if (shutdown_sockets)
        for (int i = 0; i < s->nouts; i++)
            shutdown(s->outs[i]->conn.fd, SHUT_RDWR);
}

void dp_sender_free(struct dp_sender *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->start_cv);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->nworkers; i++) {
        pthread_join(s->workers[i].thread, NULL);
        ZSTD_freeCCtx(s->workers[i].cctx);
        free(s->workers[i].gather);
        free(s->workers[i].rec);
    }
    free(s->workers);
    free(s->outs);
    free(s);
}

/* ======================================================================================
 * Destination side: placing page batches in memory
 * ==================================================================================== */
static int destination_space(struct dp_space *s, int rounds, uint32_t n, const uint64_t *first,
                             const uint64_t *count, uint8_t *const *base, const int *fds,
                             const uint64_t *fd_offs, char *err, size_t errlen)
{
    free(s->written);
    free(s->seen);
    if (space_set(s, n, first, count, base, fds, fd_offs, err, errlen))
        return -1;
    s->drop = base == NULL;
    s->written = calloc(s->total ? s->total : 1, 1);
    s->seen = rounds ? calloc((s->total + 63) / 64 + 1, 8) : NULL;
    if (!s->written || (rounds && !s->seen)) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

/* Write `pages` consecutive pages at pfn of range r: through the memory file where there
 * is one (pwrite allocates the pages without faulting them into this process, about twice
 * as fast into fresh memory here as a copy through the mapping), else by copying. */
static int put_pages(const struct dp_space *sp, int r, uint64_t pfn, const uint8_t *src, uint32_t pages)
{
    uint64_t off = (pfn - sp->first[r]) * DP_PAGE;
    size_t len = (size_t)pages * DP_PAGE;
    if (sp->fd[r] < 0) {
        memcpy(sp->base[r] + off, src, len);
        return 0;
    }
    off += sp->fd_off[r];
    while (len) {
        ssize_t n = pwrite(sp->fd[r], src, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        src += n;
        off += n;
        len -= n;
    }
    return 0;
}

/* Zero `pages` consecutive pages that held data: punch them out of the memory file (they
 * read as zero and their memory is freed), or clear them through the mapping. */
static int zero_pages(const struct dp_space *sp, int r, uint64_t pfn, uint32_t pages)
{
    uint64_t off = (pfn - sp->first[r]) * DP_PAGE;
    if (sp->fd[r] < 0) {
        memset(sp->base[r] + off, 0, (size_t)pages * DP_PAGE);
        return 0;
    }
    return fallocate(sp->fd[r], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(off + sp->fd_off[r]),
                     (off_t)pages * DP_PAGE);
}

/* One batch checked and decoded (decode_batch), waiting to be written (write_batch): its
 * entries and data pages stay in the caller's body, or in the placer's scratch when they
 * were compressed, until then. */
struct decoded {
    struct dp_space *sp;
    uint32_t n;
    const uint8_t *entries;     /* n entries (pfn, type, reserved) */
    const uint8_t *pages;       /* the data pages, in entry order */
    uint64_t pos[DP_MAX_BATCH]; /* each entry's page index in its space */
    int rng[DP_MAX_BATCH];      /* each entry's range */
};

struct placer {
    ZSTD_DCtx *dctx;
    uint8_t *scratch;           /* one batch's decompressed pages */
    struct decoded *d;
};

static int placer_init(struct placer *p)
{
    p->dctx = ZSTD_createDCtx();
    p->scratch = malloc(DP_MAX_BATCH * DP_PAGE);
    p->d = calloc(1, sizeof *p->d);
    if (!p->dctx || !p->scratch || !p->d)
        return -1;
    ZSTD_DCtx_setParameter(p->dctx, ZSTD_d_windowLogMax, 22);   /* MAX_ZSTD_WINDOW, 4 MiB (specs/stream-format.md) */
    return 0;
}

static void placer_free(struct placer *p)
{
    ZSTD_freeDCtx(p->dctx);
    free(p->scratch);
    free(p->d);
}

/* Check a PAGE_DATA or PAGE_DATA_ZSTD body completely (its data decompressed into the
 * placer's scratch) into pl->d, writing nothing. With `round` >= 0, a pfn may come once
 * in that round (the space's `seen` bits, set here); otherwise once in the batch. 0, or
 * -1 with one line in why. */
static int decode_batch(struct dp_space *spaces, struct placer *pl, uint32_t type, const uint8_t *body,
                        uint32_t len, long round, char *why, size_t whylen)
{
    pl->d->sp = NULL;           /* the slot holds no batch until this one passes every check */
    if (len < DP_BATCH_HDR) {
        snprintf(why, whylen, "body is %u bytes, shorter than its header", len);
        return -1;
    }
    uint32_t space = get32(body), n = get32(body + 4);
    if (space >= DP_SPACES) {
        snprintf(why, whylen, "unknown address space %u", space);
        return -1;
    }
    if (n < 1 || n > DP_MAX_BATCH) {
        snprintf(why, whylen, "count %u outside 1..%u", n, DP_MAX_BATCH);
        return -1;
    }
    if (len < DP_BATCH_HDR + (uint64_t)DP_ENTRY * n) {
        snprintf(why, whylen, "body is %u bytes, %u entries need %u", len, n, DP_BATCH_HDR + DP_ENTRY * n);
        return -1;
    }
    struct dp_space *sp = &spaces[space];
    if (!sp->nranges) {
        snprintf(why, whylen, "pages of space %u, which has no memory", space);
        return -1;
    }
    const uint8_t *entries = body + DP_BATCH_HDR;
    uint32_t data_type = type == T_PAGE_DATA ? P_NORMAL : P_COMPRESSED, ndata = 0;
    uint64_t *pos = pl->d->pos;
    int *rng = pl->d->rng;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *e = entries + DP_ENTRY * i;
        uint64_t pfn = get64(e);
        uint32_t ptype = get32(e + 8);
        if (ptype != P_ZERO && ptype != data_type) {
            snprintf(why, whylen, "pfn 0x%llx has page type %u, not allowed here", (unsigned long long)pfn, ptype);
            return -1;
        }
        if (get32(e + 12)) {
            snprintf(why, whylen, "pfn 0x%llx entry has nonzero reserved field", (unsigned long long)pfn);
            return -1;
        }
        rng[i] = range_of(sp, pfn);
        if (rng[i] < 0) {
            snprintf(why, whylen, "pfn 0x%llx outside the memory of space %u", (unsigned long long)pfn, space);
            return -1;
        }
        pos[i] = sp->index[rng[i]] + (pfn - sp->first[rng[i]]);
        ndata += ptype == data_type;
    }
    const uint8_t *data = entries + DP_ENTRY * n;
    size_t datalen = len - DP_BATCH_HDR - DP_ENTRY * n, expect = (size_t)ndata * DP_PAGE;
    const uint8_t *pages = data;
    if (type == T_PAGE_DATA) {
        if (datalen != expect) {
            snprintf(why, whylen, "carries %zu data bytes, %u pages need %zu", datalen, ndata, expect);
            return -1;
        }
    } else if (ndata == 0) {
        if (datalen) {
            snprintf(why, whylen, "has %zu data bytes but no compressed pages", datalen);
            return -1;
        }
    } else {
        if (datalen < 4 || get32(data) != ZSTD_MAGICNUMBER) {
            snprintf(why, whylen, "bad zstd frame: not a zstd frame (a skippable frame, or no magic)");
            return -1;
        }
        unsigned long long declared = ZSTD_getFrameContentSize(data, datalen);
        if (declared != expect) {
            snprintf(why, whylen, "zstd frame declares %s bytes, expected %zu",
                     declared == ZSTD_CONTENTSIZE_UNKNOWN ? "unknown"
                     : declared == ZSTD_CONTENTSIZE_ERROR ? "no readable number of" : "another number of", expect);
            return -1;
        }
        if (ZSTD_getDictID_fromFrame(data, datalen)) {
            snprintf(why, whylen, "zstd frame needs dictionary %u", ZSTD_getDictID_fromFrame(data, datalen));
            return -1;
        }
        /* the window (RFC 8878 3.1.1.1.2) at most MAX_ZSTD_WINDOW, as the reader checks it:
         * windowLogMax binds only streaming decompression, not this one-shot call */
        if (!(data[4] & 0x20) && datalen > 5) {
            uint64_t base = 1ull << (10 + (data[5] >> 3)), window = base + base / 8 * (data[5] & 7);
            if (window > (uint64_t)DP_MAX_BATCH * DP_PAGE) {
                snprintf(why, whylen, "zstd frame asks for a %llu-byte window, more than %u",
                         (unsigned long long)window, DP_MAX_BATCH * DP_PAGE);
                return -1;
            }
        }
        size_t framelen = ZSTD_findFrameCompressedSize(data, datalen);
        if (ZSTD_isError(framelen) || framelen != datalen) {
            snprintf(why, whylen, "bad zstd frame: %s", ZSTD_isError(framelen) ? ZSTD_getErrorName(framelen)
                                                                                : "bytes after the frame");
            return -1;
        }
        size_t got = ZSTD_decompressDCtx(pl->dctx, pl->scratch, expect, data, datalen);
        if (ZSTD_isError(got) || got != expect) {
            snprintf(why, whylen, "bad zstd frame: %s", ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short output");
            return -1;
        }
        pages = pl->scratch;
    }
    /* every entry and the data checked; a pfn once per batch (and once per round) */
    int ascending = 1;
    for (uint32_t i = 0; i < n; i++) {
        int dup = 0;
        if (round >= 0) {
            uint64_t bit = 1ull << (pos[i] & 63);
            dup = (__atomic_fetch_or(&sp->seen[pos[i] >> 6], bit, __ATOMIC_RELAXED) & bit) != 0;
        } else {        /* ascending so far: no duplicate; after a descent, look back (rare) */
            if (i && pos[i] <= pos[i - 1])
                ascending = 0;
            for (uint32_t j = 0; !ascending && j < i && !dup; j++)
                dup = pos[j] == pos[i];
        }
        if (dup) {
            uint64_t pfn = get64(entries + DP_ENTRY * i);
            if (round >= 0)
                snprintf(why, whylen, "pfn 0x%llx sent twice in round %ld", (unsigned long long)pfn, round);
            else
                snprintf(why, whylen, "pfn 0x%llx appears twice in one batch", (unsigned long long)pfn);
            return -1;
        }
    }
    pl->d->sp = sp;
    pl->d->n = n;
    pl->d->entries = entries;
    pl->d->pages = pages;
    return 0;
}

/* Place the batch decode_batch left in d in its space (the last copy of a page wins; a
 * ZERO page over data is zeroed). 0 (and the batch's pages and zero pages), or -1 with
 * one line in why. */
static int write_batch(const struct decoded *d, uint32_t *npages, uint32_t *nzero, char *why, size_t whylen)
{
    struct dp_space *sp = d->sp;
    const uint8_t *entries = d->entries, *pages = d->pages;
    const uint64_t *pos = d->pos;
    const int *rng = d->rng;
    uint32_t n = d->n, zero = 0;
    for (uint32_t i = 0; i < n;) {
        uint64_t pfn = get64(entries + DP_ENTRY * i);
        int is_zero = get32(entries + DP_ENTRY * i + 8) == P_ZERO;
        uint32_t j = i + 1;             /* a run: same kind, same range, consecutive pfns */
        while (j < n && rng[j] == rng[i] && get64(entries + DP_ENTRY * j) == pfn + (j - i) &&
               (get32(entries + DP_ENTRY * j + 8) == P_ZERO) == is_zero)
            j++;
        uint32_t run = j - i;
        if (is_zero) {
            zero += run;
            int held = 0;
            for (uint32_t k = i; k < j; k++) {
                held |= sp->written[pos[k]];
                sp->written[pos[k]] = 0;
            }
            if (held && !sp->drop && zero_pages(sp, rng[i], pfn, run)) {   /* fresh memory is zero */
                snprintf(why, whylen, "zeroing pages failed: %s", strerror(errno));
                return -1;
            }
        } else {
            if (!sp->drop && put_pages(sp, rng[i], pfn, pages, run)) {
                snprintf(why, whylen, "writing guest memory failed: %s", strerror(errno));
                return -1;
            }
            for (uint32_t k = i; k < j; k++)
                sp->written[pos[k]] = 1;
            pages += (size_t)run * DP_PAGE;
        }
        i = j;
    }
    *npages = n;
    *nzero = zero;
    return 0;
}

static int place(struct dp_space *spaces, struct placer *pl, uint32_t type, const uint8_t *body, uint32_t len,
                 long round, uint32_t *npages, uint32_t *nzero, char *why, size_t whylen)
{
    if (decode_batch(spaces, pl, type, body, len, round, why, whylen))
        return -1;
    return write_batch(pl->d, npages, nzero, why, whylen);
}

/* A destination for the page batches of one stream read by the caller (a file's
 * restore). Each of its `slots` holds one batch between dp_target_decode, which checks it
 * completely and decompresses it, and dp_target_write, which places it: callers on
 * different threads decode batches side by side, each in a slot of its own, and the
 * writes take turns in stream order (each batch's turn is its index in the stream's
 * batches, from 0), so the last copy of a page wins. A batch that failed, and every batch
 * after it, is not written. */
#define DP_TARGET_MAX_SLOTS 16

struct dp_target {
    struct dp_space spaces[DP_SPACES];
    int nslots;
    struct placer pl[DP_TARGET_MAX_SLOTS];
    pthread_mutex_t lock;
    pthread_cond_t turn_cv;
    uint64_t turn;              /* the batch whose write is next */
    int failed;                 /* a batch failed: write no more */
    int stopped;                /* stopped: write no more, and wait for no turn */
};

void dp_target_free(struct dp_target *t);

struct dp_target *dp_target_new(int slots, char *err, size_t errlen)
{
    if (slots < 1 || slots > DP_TARGET_MAX_SLOTS) {
        snprintf(err, errlen, "a target has 1..%d slots", DP_TARGET_MAX_SLOTS);
        return NULL;
    }
    struct dp_target *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->turn_cv, NULL);
    for (; t->nslots < slots; t->nslots++)
        if (placer_init(&t->pl[t->nslots])) {
            t->nslots++;                /* freed with the rest */
            dp_target_free(t);
            snprintf(err, errlen, "out of memory");
            return NULL;
        }
    return t;
}

int dp_target_set_space(struct dp_target *t, uint32_t space, uint32_t n, const uint64_t *first,
                        const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                        char *err, size_t errlen)
{
    if (space >= DP_SPACES) {
        snprintf(err, errlen, "unknown space %u", space);
        return -1;
    }
    return destination_space(&t->spaces[space], 0, n, first, count, base, fds, fd_offs, err, errlen);
}

/* Check page batch body (record type 3 or 4) completely into `slot`, writing nothing; the
 * body must stay as it is until the slot is written. 0, or -1 with the reason. */
int dp_target_decode(struct dp_target *t, int slot, uint32_t type, const uint8_t *body, uint32_t len,
                     char *err, size_t errlen)
{
    if (slot < 0 || slot >= t->nslots) {
        snprintf(err, errlen, "no slot %d", slot);
        return -1;
    }
    if (type != T_PAGE_DATA && type != T_PAGE_DATA_ZSTD) {
        snprintf(err, errlen, "record type 0x%x is not a page batch", type);
        return -1;
    }
    return decode_batch(t->spaces, &t->pl[slot], type, body, len, -1, err, errlen);
}

/* Wait for batch `turn`'s turn to write (DP_TURN_NEXT: the next one, no wait), or for the
 * target to be stopped; returns with the lock held. */
#define DP_TURN_NEXT UINT64_MAX
static void await_turn(struct dp_target *t, uint64_t turn)
{
    pthread_mutex_lock(&t->lock);
    while (turn != DP_TURN_NEXT && t->turn != turn && !t->stopped)
        pthread_cond_wait(&t->turn_cv, &t->lock);
}

static void pass_turn(struct dp_target *t)
{
    t->turn++;
    pthread_cond_broadcast(&t->turn_cv);
    pthread_mutex_unlock(&t->lock);
}

/* Batch `turn`, decoded into `slot`, is written once every batch before it has had its
 * turn. 0 with its page and zero counts; 1 when it is not written because an earlier
 * batch failed or the target was stopped; -1 when writing it failed (the reason in err).
 * A caller writing one batch at a time may pass DP_TURN_NEXT; mixed with numbered turns
 * on one target, that would make a numbered turn wait forever. */
int dp_target_write(struct dp_target *t, int slot, uint64_t turn, uint32_t *npages, uint32_t *nzero,
                    char *err, size_t errlen)
{
    int bad = slot < 0 || slot >= t->nslots || !t->pl[slot].d->sp;
    await_turn(t, turn);
    int rc = 1;
    if (bad) {                  /* the caller's error; the turn passes all the same */
        snprintf(err, errlen, "slot %d holds no decoded batch", slot);
        t->failed = 1;
        pass_turn(t);
        return -1;
    }
    if (!t->failed && !t->stopped) {
        /* the lock is held through the write: the next batch's turn waits for it anyway */
        rc = write_batch(t->pl[slot].d, npages, nzero, err, errlen);
        t->failed = rc != 0;
    }
    t->pl[slot].d->sp = NULL;
    pass_turn(t);
    return rc;
}

/* Batch `turn` failed its check: in its turn, nothing after it is written any more.
 * 1 if it is the first batch to fail (its error is the restore's), 0 if an earlier one
 * failed or the target was stopped. */
int dp_target_fail(struct dp_target *t, uint64_t turn)
{
    await_turn(t, turn);
    int first = !t->failed && !t->stopped;
    t->failed = 1;
    pass_turn(t);
    return first;
}

/* Write nothing more (a stopped restore): a write or fail waiting for its turn, or called
 * later, returns at once. */
void dp_target_stop(struct dp_target *t)
{
    pthread_mutex_lock(&t->lock);
    t->stopped = 1;
    pthread_cond_broadcast(&t->turn_cv);
    pthread_mutex_unlock(&t->lock);
}

void dp_target_free(struct dp_target *t)
{
    if (!t)
        return;
    for (unsigned s = 0; s < DP_SPACES; s++)
        free(t->spaces[s].written);
    for (int i = 0; i < t->nslots; i++)
        placer_free(&t->pl[i]);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->turn_cv);
    free(t);
}

/* ======================================================================================
 * Destination side: data channels
 * ==================================================================================== */
struct dp_channel_summary {
    uint32_t index, rounds, final, reserved;
    uint64_t records, pages, bytes;
    uint8_t digest[16];
};

/* The destination's end of the handoff: channel 0's connection, taken from its receiver */
struct dp_handoff {
    struct dp_conn conn;
    struct handoff_msg msg;         /* GO */
};

struct dp_receiver;

struct dp_channel {
    struct dp_receiver *r;
    int index, started;
    struct dp_conn conn;
    pthread_t thread;
    uint8_t *buf;               /* one record */
    struct placer pl;
    XXH3_state_t *xxh;
    uint64_t records, pages, offset;
    uint32_t round;             /* the next round this channel reads */
    int final;
    struct dp_channel_summary summary;
    double place_seconds;
    uint64_t placed_bytes;
    /* channel 0 of a handoff: after its FINAL sync its thread moves the connection here
     * (handed: done, or failed; conn.fd is then -1: the receiver's close no longer shuts
     * its socket down) for dp_receiver_handoff to take */
    struct dp_handoff *handoff;
    int handed;
};

struct dp_receiver {
    int nchannels, version;
    uint8_t token[32];
    void *tls_ctx;
    double timeout, handshake;
    struct dp_space spaces[DP_SPACES];
    struct dp_channel *channels;
    pthread_mutex_t lock;
    pthread_cond_t cv;
    uint32_t arrived;           /* channels at the barrier of round `barrier_round` */
    uint32_t completed;         /* rounds every channel has finished */
    uint32_t finals;            /* channels that read their FINAL sync */
    uint64_t cap;               /* most bytes all channels together may carry (0: no cap) */
    uint64_t bytes;             /* bytes the channels have read or are reading (atomic) */
    uint64_t carried;           /* bytes the channels have read, as they come (atomic) */
    int open;                   /* its memory is set: channels may place pages */
    int handoff;                /* channel 0 carries the handoff after its FINAL sync */
    int waiters;                /* threads in dp_receiver_wait: free waits for them to leave */
    int closing, closed;
    struct dp_error err;
};

void dp_receiver_free(struct dp_receiver *r);
void dp_handoff_free(struct dp_handoff *h);

/* A receiver of nchannels data channels (stream format `version`, this relocation's
 * token); tls_ctx: a server context, or NULL on a plain link. A channel's TLS handshake
 * is done within `handshake` seconds in all; each later read within `timeout`. */
struct dp_receiver *dp_receiver_new(int nchannels, uint32_t version, const uint8_t token[32], void *tls_ctx,
                                    double timeout, double handshake, char *err, size_t errlen)
{
    if (nchannels < 1 || nchannels > 64) {
        snprintf(err, errlen, "1..64 channels");
        return NULL;
    }
    struct dp_receiver *r = calloc(1, sizeof *r);
    if (!r || !(r->channels = calloc(nchannels, sizeof *r->channels))) {
        free(r);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->nchannels = nchannels;
    r->version = version;
    memcpy(r->token, token, 32);
    r->tls_ctx = tls_ctx;
    r->timeout = timeout;
    r->handshake = handshake;
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->err.lock, NULL);
    pthread_cond_init(&r->cv, NULL);
    return r;
}

/* The memory pages of `space` go to: ranges with host addresses (base NULL for all:
 * checked and dropped). Before any channel starts. */
int dp_receiver_set_space(struct dp_receiver *r, uint32_t space, uint32_t n, const uint64_t *first,
                          const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                          char *err, size_t errlen)
{
    if (space >= DP_SPACES) {
        snprintf(err, errlen, "unknown space %u", space);
        return -1;
    }
    return destination_space(&r->spaces[space], 1, n, first, count, base, fds, fd_offs, err, errlen);
}

/* At most `cap` bytes (headers, records, syncs) on all the channels together, a
 * relocation's stream cap: the daemon counts only the main stream it relays, and a source
 * could otherwise send rounds on the channels for ever. 0: no cap. Before any channel is
 * added. */
void dp_receiver_set_cap(struct dp_receiver *r, uint64_t cap)
{
    r->cap = cap;
}

/* Count `n` more bytes of channel ch, about to be read, against the cap; 0, or -1 once
 * all channels together exceed it (the error set: every channel stops; the body of the
 * record that crosses it is not read, nothing of it placed) */
static int count_bytes(struct dp_channel *ch, uint64_t n)
{
    struct dp_receiver *r = ch->r;
    if (!r->cap || __atomic_add_fetch(&r->bytes, n, __ATOMIC_RELAXED) <= r->cap)
        return 0;
    set_error(&r->err, "channel %d: the data channels carry more than their cap of %llu bytes in all "
              "(offset %llu of this one)", ch->index, (unsigned long long)r->cap, (unsigned long long)ch->offset);
    return -1;
}

/* Bytes all channels have read so far, as they come, a record's body part by part: that
 * they grow is the channels' sign of life while the main stream is quiet for a round. */
uint64_t dp_receiver_bytes(struct dp_receiver *r)
{
    return __atomic_load_n(&r->carried, __ATOMIC_RELAXED);
}

/* every channel's socket shut down, but one handed over (hand_over, which sets its fd to -1
 * under the lock this is called with) */
static void shutdown_channels(struct dp_receiver *r)
{
    for (int i = 0; i < r->nchannels; i++)
        if (r->channels[i].started && r->channels[i].conn.fd >= 0)
            shutdown(r->channels[i].conn.fd, SHUT_RDWR);
}

static void fail_all(struct dp_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    pthread_cond_broadcast(&r->cv);
    shutdown_channels(r);
    pthread_mutex_unlock(&r->lock);
}

#define CH_FAIL(ch, idx, type, ...) do {                                                     \
        char _m[400];                                                                        \
        snprintf(_m, sizeof _m, __VA_ARGS__);                                                \
        set_error(&(ch)->r->err, "channel %d, record %llu at offset %llu (type 0x%08x): %s", \
                  (ch)->index, (unsigned long long)(idx), (unsigned long long)(ch)->offset,  \
                  (unsigned)(type), _m);                                                     \
    } while (0)

/* place a page batch of this channel's current round; 0, or -1 after CH_FAIL */
static int place_batch(struct dp_channel *ch, uint32_t type, const uint8_t *body, uint32_t len)
{
    char why[300];
    uint32_t npages, nzero;
    double t0 = now();
    if (place(ch->r->spaces, &ch->pl, type, body, len, ch->round, &npages, &nzero, why, sizeof why)) {
        CH_FAIL(ch, ch->records, type, "%s", why);
        return -1;
    }
    ch->place_seconds += now() - t0;
    ch->placed_bytes += (uint64_t)(npages - nzero) * DP_PAGE;
    ch->pages += npages;
    return 0;
}

/* wait until every channel has reached the end of round `round` (the last to arrive
 * clears the round's seen bits, and refuses syncs of that round FINAL on some channels
 * only: the others would wait for them forever); 0, or -1 if the receiver failed meanwhile */
static int barrier(struct dp_channel *ch, uint32_t round)
{
    struct dp_receiver *r = ch->r;
    pthread_mutex_lock(&r->lock);
    if (++r->arrived == (uint32_t)r->nchannels) {
        for (int i = 1; i < r->nchannels; i++)
            if (r->channels[i].final != r->channels[0].final) {
                int with = r->channels[0].final ? 0 : i;
                set_error(&r->err, "channel %d ends round %u with its FINAL sync, channel %d does not "
                          "(every channel ends the same rounds)", with, round, with ? 0 : i);
                break;
            }
        for (unsigned s = 0; s < DP_SPACES; s++)
            if (r->spaces[s].seen)
                memset(r->spaces[s].seen, 0, ((r->spaces[s].total + 63) / 64 + 1) * 8);
        r->arrived = 0;
        r->completed = round + 1;
        pthread_cond_broadcast(&r->cv);
    } else {
        while (r->completed <= round && !failed(&r->err) && !r->closing)
            pthread_cond_wait(&r->cv, &r->lock);
    }
    int rc = failed(&r->err) || r->closing ? -1 : 0;
    pthread_mutex_unlock(&r->lock);
    return rc;
}

static int on_sync(struct dp_channel *ch, const uint8_t *b, uint32_t len)
{
    uint64_t idx = ch->records;
    if (len != DP_SYNC_BODY) {
        CH_FAIL(ch, idx, T_CHANNEL_SYNC, "body is %u bytes, expected %u", len, DP_SYNC_BODY);
        return -1;
    }
    uint32_t round = get32(b), flags = get32(b + 4);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(ch->xxh));
    if (flags & ~SYNC_FINAL || get64(b + 48)) {
        CH_FAIL(ch, idx, T_CHANNEL_SYNC, "flags 0x%x or reserved field not allowed", flags);
        return -1;
    }
    if (round != ch->round) {
        CH_FAIL(ch, idx, T_CHANNEL_SYNC, "ends round %u, this channel is in round %u", round, ch->round);
        return -1;
    }
    if (get64(b + 8) != ch->records || get64(b + 16) != ch->pages || get64(b + 24) != ch->offset ||
        memcmp(b + 32, c.digest, 16)) {
        CH_FAIL(ch, idx, T_CHANNEL_SYNC, "counts or digest differ from the channel's (records %llu, pages %llu)",
                (unsigned long long)ch->records, (unsigned long long)ch->pages);
        return -1;
    }
    pthread_mutex_lock(&ch->r->lock);
    ch->summary = (struct dp_channel_summary){.index = ch->index, .rounds = round + 1, .final = flags & SYNC_FINAL,
                                              .records = ch->records, .pages = ch->pages, .bytes = ch->offset};
    memcpy(ch->summary.digest, c.digest, 16);
    pthread_mutex_unlock(&ch->r->lock);
    ch->final = flags & SYNC_FINAL;
    return 0;
}

/* Channel 0 of a handoff, its FINAL sync read: its connection moved into a dp_handoff, on
 * a descriptor of its own (a dup: the socket stays the caller's to close), here on the
 * channel's thread, while the restore goes on (a dup and a new TLS BIO took 30-50 us on
 * the receiving process's downtime path) */
static void hand_over(struct dp_channel *ch)
{
    struct dp_receiver *r = ch->r;
    struct dp_handoff *h = calloc(1, sizeof *h);
    if (h && (h->conn.fd = dup(ch->conn.fd)) >= 0 && (!ch->conn.ssl || SSL_set_fd(ch->conn.ssl, h->conn.fd))) {
        h->conn.ssl = ch->conn.ssl;
    } else {
        if (h && h->conn.fd >= 0)
            close(h->conn.fd);
        free(h);
        h = NULL;
        ERR_clear_error();
    }
    pthread_mutex_lock(&r->lock);
    if (h) {
        ch->conn.ssl = NULL;
        ch->conn.fd = -1;           /* the caller's socket: closed by the caller, not here */
        ch->handoff = h;
    }
    ch->handed = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->lock);
}

static void *channel_main(void *arg)
{
    struct dp_channel *ch = arg;
    struct dp_receiver *r = ch->r;
    const char *why = NULL;
    if (r->tls_ctx) {
        ch->conn.ssl = SSL_new(r->tls_ctx);
        if (!ch->conn.ssl) {
            set_error(&r->err, "channel %d: TLS: %s", ch->index, tls_reason());
            goto out;
        }
        SSL_set_fd(ch->conn.ssl, ch->conn.fd);
        int rc = tls_handshake(ch->conn.ssl, ch->conn.fd, 1, r->handshake);
        if (rc != 1) {
            char reason[256];
            set_error(&r->err, "channel %d: TLS handshake failed: %s", ch->index,
                      handshake_why(ch->conn.ssl, rc, r->handshake, reason, sizeof reason));
            goto out;
        }
    }
    uint8_t hdr[DP_CHANNEL_HDR];
    if (count_bytes(ch, sizeof hdr))
        goto out;
    int rc = conn_read(&ch->conn, hdr, sizeof hdr, &why);
    if (rc != 1) {
        set_error(&r->err, "channel %d: no channel header: %s", ch->index, rc ? why : "the channel closed");
        goto out;
    }
    if (memcmp(hdr, CHANNEL_MAGIC, 8) || get32(hdr + 8) != (uint32_t)r->version ||
        get32(hdr + 12) != (uint32_t)ch->index || memcmp(hdr + 16, r->token, 32)) {
        set_error(&r->err, "channel %d: its header is not this relocation's (magic, version %u, index %u or token)",
                  ch->index, get32(hdr + 8), get32(hdr + 12));
        goto out;
    }
    XXH3_128bits_update(ch->xxh, hdr, sizeof hdr);
    ch->offset = sizeof hdr;
    pthread_mutex_lock(&r->lock);           /* TLS and the header done: wait for the memory */
    while (!r->open && !r->closing && !failed(&r->err))
        pthread_cond_wait(&r->cv, &r->lock);
    int go = r->open && !r->closing;
    pthread_mutex_unlock(&r->lock);
    if (!go)                /* closed, or another channel failed: place nothing */
        goto out;
    while (!ch->final && !r->closing && !failed(&r->err)) {
        uint8_t *rec = ch->buf;
        rc = conn_read(&ch->conn, rec, DP_REC_HDR, &why);
        if (rc != 1) {
            set_error(&r->err, "channel %d: %s before its FINAL sync (offset %llu)", ch->index,
                      rc ? why : "the channel ended", (unsigned long long)ch->offset);
            goto out;
        }
        uint32_t type = get32(rec), len = get32(rec + 4);
        if (get32(rec + 8)) {
            CH_FAIL(ch, ch->records, type, "record header reserved field is nonzero");
            goto out;
        }
        uint32_t cap = type == T_CHANNEL_SYNC ? DP_SYNC_BODY : (uint32_t)DP_MAX_PAGE_BODY;
        if (len > cap) {
            CH_FAIL(ch, ch->records, type, "record body length %u exceeds %u", len, cap);
            goto out;
        }
        if (count_bytes(ch, DP_REC_HDR + padded(len)))
            goto out;
        rc = conn_read(&ch->conn, rec + DP_REC_HDR, padded(len), &why);
        if (rc != 1) {
            set_error(&r->err, "channel %d: %s (offset %llu)", ch->index, rc ? why : "the channel ended inside a record",
                      (unsigned long long)ch->offset);
            goto out;
        }
        uint8_t *body = rec + DP_REC_HDR;
        if (record_crc(rec, body, len) != get32(rec + 12)) {
            CH_FAIL(ch, ch->records, type, "record CRC-32 mismatch");
            goto out;
        }
        for (uint32_t i = len; i < padded(len); i++)
            if (body[i]) {
                CH_FAIL(ch, ch->records, type, "record padding is not zero");
                goto out;
            }
        if (type == T_CHANNEL_SYNC) {
            if (on_sync(ch, body, len))
                goto out;
            XXH3_128bits_update(ch->xxh, rec, DP_REC_HDR + padded(len));
            ch->records++;
            ch->offset += DP_REC_HDR + padded(len);
            if (barrier(ch, ch->round))
                goto out;
            ch->round++;
            if (ch->final) {
                if (bytes_waiting(&ch->conn)) {     /* with it: refused before it counts */
                    set_error(&r->err, "channel %d: bytes after its FINAL sync", ch->index);
                    goto out;
                }
                pthread_mutex_lock(&r->lock);
                r->finals++;
                pthread_cond_broadcast(&r->cv);
                pthread_mutex_unlock(&r->lock);
            }
            continue;
        }
        if (type != T_PAGE_DATA && type != T_PAGE_DATA_ZSTD) {
            CH_FAIL(ch, ch->records, type, "not a record a data channel carries");
            goto out;
        }
        if (place_batch(ch, type, body, len))
            goto out;
        XXH3_128bits_update(ch->xxh, rec, DP_REC_HDR + padded(len));
        ch->records++;
        ch->offset += DP_REC_HDR + padded(len);
    }
    if (!ch->final)             /* closed, or another channel failed */
        goto out;
    if (r->handoff && ch->index == 0) {     /* READY and GO follow: dp_receiver_handoff */
        hand_over(ch);
        goto out;
    }
    /* nothing may follow the FINAL sync */
    uint8_t extra;
    rc = conn_read(&ch->conn, &extra, 1, &why);
    if (rc == 1)
        set_error(&r->err, "channel %d: bytes after its FINAL sync", ch->index);
out:
    if (failed(&r->err))
        fail_all(r);
    return NULL;
}

/* The memory is set (dp_receiver_set_space): the channels may place pages. Until then
 * they do their TLS handshakes and read their headers, and wait. */
void dp_receiver_open(struct dp_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    r->open = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->lock);
}

static int add_channel(struct dp_receiver *r, int index, int fd, char *err, size_t errlen)
{
    if (r->closing) {
        snprintf(err, errlen, "the receiver is closed");
        return -1;
    }
    if (index < 0 || index >= r->nchannels || r->channels[index].started) {
        snprintf(err, errlen, "channel %d is not expected", index);
        return -1;
    }
    struct dp_channel *ch = &r->channels[index];
    ch->r = r;
    ch->index = index;
    ch->conn.fd = fd;
    ch->conn.carried = &r->carried;
    ch->buf = malloc(DP_REC_CAP);
    ch->xxh = XXH3_createState();
    if (!ch->buf || !ch->xxh || placer_init(&ch->pl)) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    XXH3_128bits_reset(ch->xxh);
    set_blocking(fd);
    if (r->timeout > 0)
        set_timeouts(fd, r->timeout);
    if (pthread_create(&ch->thread, NULL, channel_main, ch)) {
        snprintf(err, errlen, "cannot start a channel thread");
        return -1;
    }
    ch->started = 1;
    return 0;
}

/* Take channel `index`: a connected socket (TLS not yet started: its handshake runs on
 * the channel's own thread). 0, or -1 with err. */
int dp_receiver_add(struct dp_receiver *r, int index, int fd, char *err, size_t errlen)
{
    pthread_mutex_lock(&r->lock);       /* close joins the threads started before it */
    int rc = add_channel(r, index, fd, err, errlen);
    pthread_mutex_unlock(&r->lock);
    return rc;
}

/* Wait until every channel has finished round `round` (rounds count from 0), or, with
 * `final`, read its FINAL sync, whatever round that ended (a caller expecting another
 * round finds the mismatch in the summaries at once: waiting for a round no channel can
 * reach any more would only run out the timeout); up to timeout seconds. 1 done, 0 timed
 * out, -1 failed (the reason in err). */
int dp_receiver_wait(struct dp_receiver *r, uint32_t round, int final, double timeout, char *err, size_t errlen)
{
    struct timespec until = deadline_after(CLOCK_REALTIME, timeout);
    int rc = 1;
    pthread_mutex_lock(&r->lock);
    r->waiters++;
    for (;;) {
        if (failed(&r->err)) {
            rc = -1;
            break;
        }
        if (r->closing) {
            rc = 0;
            break;
        }
        int started = 0;
        for (int i = 0; i < r->nchannels; i++)
            started += r->channels[i].started;
        if (started == r->nchannels &&
            (final ? r->finals == (uint32_t)r->nchannels : r->completed > round))
            break;
        if (pthread_cond_timedwait(&r->cv, &r->lock, &until) == ETIMEDOUT) {
            rc = 0;
            break;
        }
    }
    if (--r->waiters == 0)
        pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->lock);
    if (rc < 0)
        snprintf(err, errlen, "%s", r->err.text);
    return rc;
}

/* what each channel said at its last sync, and the seconds spent placing pages */
void dp_receiver_summary(struct dp_receiver *r, struct dp_channel_summary *out, double *place_seconds,
                         uint64_t *placed_bytes)
{
    *place_seconds = 0;
    *placed_bytes = 0;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->nchannels; i++) {
        out[i] = r->channels[i].summary;
        *place_seconds += r->channels[i].place_seconds;
        *placed_bytes += r->channels[i].placed_bytes;
    }
    pthread_mutex_unlock(&r->lock);
}

/* Stop every channel thread (shutting its socket down) and wait for them; a thread in
 * dp_receiver_wait is woken and returns 0, as later waits do at once (free waits for
 * them to leave). Idempotent, from any thread: a second caller returns once the first
 * is done. The sockets themselves are the caller's to close. */
void dp_receiver_close(struct dp_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    if (r->closing) {               /* closed, or another thread closing: wait for that */
        while (!r->closed)
            pthread_cond_wait(&r->cv, &r->lock);
        pthread_mutex_unlock(&r->lock);
        return;
    }
    r->closing = 1;                 /* waiters return 0; close does not wait for them to */
    pthread_cond_broadcast(&r->cv); /* leave (a woken thread may take milliseconds to run */
    shutdown_channels(r);           /* here): free does, before the memory goes */
    pthread_mutex_unlock(&r->lock);
    for (int i = 0; i < r->nchannels; i++) {
        struct dp_channel *ch = &r->channels[i];
        if (ch->started) {
            pthread_join(ch->thread, NULL);
            ch->started = 0;
        }
    }
    pthread_mutex_lock(&r->lock);
    r->closed = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->lock);
}

/* close, then free everything (no thread may use the receiver any more) */
void dp_receiver_free(struct dp_receiver *r)
{
    if (!r)
        return;
    dp_receiver_close(r);
    pthread_mutex_lock(&r->lock);
    while (r->waiters)
        pthread_cond_wait(&r->cv, &r->lock);
    pthread_mutex_unlock(&r->lock);
    for (int i = 0; i < r->nchannels; i++) {
        struct dp_channel *ch = &r->channels[i];
        dp_handoff_free(ch->handoff);
        if (ch->conn.ssl)
            SSL_free(ch->conn.ssl);
        free(ch->buf);
        placer_free(&ch->pl);
        if (ch->xxh)
            XXH3_freeState(ch->xxh);
    }
    for (unsigned s = 0; s < DP_SPACES; s++) {
        free(r->spaces[s].written);
        free(r->spaces[s].seen);
    }
    free(r->channels);
    free(r);
}

/* zero when no receiver error; the first error's text otherwise */
int dp_receiver_error(struct dp_receiver *r, char *err, size_t errlen)
{
    if (!failed(&r->err))
        return 0;
    snprintf(err, errlen, "%s", r->err.text);
    return -1;
}

/* -- the handoff on channel 0 (specs/relocation.md, "The handoff on channel 0") ----------
 * After its FINAL sync, channel 0 of a relocation that agreed on it carries three messages
 * of 16 bytes: READY (destination to source: the pair is restored, paused, and awaits GO),
 * GO (source to destination) and ANSWER (destination to source: what became of GO). Each:
 * magic u8[8], a u32 value (READY: 0; GO: flags; ANSWER: a code), reserved u32 (zero). */
static const uint8_t READY_MAGIC[8] = {0x89, 'H', 'V', 'M', 'R', 'D', 'Y', '1'};
static const uint8_t GO_MAGIC[8] = {0x89, 'H', 'V', 'M', 'G', 'O', '!', '1'};
static const uint8_t ANSWER_MAGIC[8] = {0x89, 'H', 'V', 'M', 'A', 'N', 'S', '1'};
#define GO_PAUSED 1u
#define ANSWER_RUNNING 1u
#define ANSWER_PAUSED 2u
#define ANSWER_REFUSED 3u

/* Read what has come of a handoff message into m, without waiting: 1 whole, 0 not yet,
 * -1 the channel ended or failed (why) */
static int handoff_read(struct dp_conn *c, struct handoff_msg *m, const char **why)
{
    uint8_t *buf = m->b;
    uint32_t *have = &m->have;
    int flags = 0;      /* TLS reads from a socket made non-blocking meanwhile; plain, MSG_DONTWAIT */
    if (c->ssl && ((flags = fcntl(c->fd, F_GETFL)) < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
        *why = strerror(errno);
        return -1;
    }
    int rc = 0;
    while (*have < DP_HANDOFF_MSG) {
        ssize_t n;
        if (c->ssl) {
            n = SSL_read(c->ssl, buf + *have, (int)(DP_HANDOFF_MSG - *have));
            if (n <= 0) {
                int err = SSL_get_error(c->ssl, (int)n);
                if (tls_timed_out(err))     /* nothing more yet */
                    break;
                *why = err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && errno == 0)
                           ? "the channel ended" : err == SSL_ERROR_SYSCALL ? strerror(errno) : tls_reason();
                ERR_clear_error();
                rc = -1;
                break;
            }
        } else {
            n = recv(c->fd, buf + *have, DP_HANDOFF_MSG - *have, MSG_DONTWAIT);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (n <= 0) {
                *why = n ? strerror(errno) : "the channel ended";
                rc = -1;
                break;
            }
        }
        *have += (uint32_t)n;
    }
    if (c->ssl)
        fcntl(c->fd, F_SETFL, flags);
    return rc < 0 ? -1 : *have == DP_HANDOFF_MSG;
}

/* the message's value if it is `magic` with a value from lo to hi and a zero reserved
 * field, else -1 */
static int64_t handoff_value(const uint8_t *msg, const uint8_t *magic, uint32_t lo, uint32_t hi)
{
    uint32_t v = get32(msg + 8);
    if (memcmp(msg, magic, 8) || v < lo || v > hi || get32(msg + 12))
        return -1;
    return v;
}

/* Message `what` (magic, a value from lo to hi) as far as it has come, without waiting: 1
 * whole (*value), 0 not yet, -1 with err (the channel ended, or it carried anything else) */
static int handoff_take(struct dp_conn *c, struct handoff_msg *m, const uint8_t *magic, uint32_t lo,
                        uint32_t hi, const char *what, uint32_t *value, char *err, size_t errlen)
{
    const char *why = NULL;
    int rc = handoff_read(c, m, &why);
    if (rc < 0) {
        snprintf(err, errlen, "channel 0: no %s: %s", what, why);
        return -1;
    }
    if (rc == 0)
        return 0;
    int64_t v = handoff_value(m->b, magic, lo, hi);
    m->have = 0;
    if (v < 0) {
        snprintf(err, errlen, "channel 0: %s expected, other bytes came", what);
        return -1;
    }
    *value = (uint32_t)v;
    return 1;
}

/* Message `what` (magic, value) written: 0, or -1 with err */
static int handoff_write(struct dp_conn *c, const uint8_t *magic, uint32_t value, const char *what,
                         char *err, size_t errlen)
{
    uint8_t msg[DP_HANDOFF_MSG];
    const char *why = NULL;
    memcpy(msg, magic, 8);
    put32(msg + 8, value);
    put32(msg + 12, 0);
    if (conn_write(c, msg, sizeof msg, &why)) {
        snprintf(err, errlen, "channel 0: writing %s failed: %s", what, why);
        return -1;
    }
    return 0;
}

/* The source awaits READY (kind 0) or ANSWER (kind 1) on channel 0: 1 it came (*value: its
 * value), 2 `also` (a descriptor, -1: none) became readable first, 0 neither within
 * `timeout` seconds (what has come of the message is kept for the next call), -1 the
 * channel ended or carried anything else */
int dp_out_handoff(struct dp_out *o, int kind, int also, double timeout, uint32_t *value,
                   char *err, size_t errlen)
{
    double until = now() + timeout;
    for (;;) {
        int rc = kind ? handoff_take(&o->conn, &o->handoff, ANSWER_MAGIC, ANSWER_RUNNING, ANSWER_REFUSED,
                                     "ANSWER", value, err, errlen)
                      : handoff_take(&o->conn, &o->handoff, READY_MAGIC, 0, 0, "READY", value, err, errlen);
        if (rc)
            return rc;
        struct pollfd p[2] = {{o->conn.fd, POLLIN, 0}, {also, POLLIN, 0}};    /* poll skips a -1 */
        double left = until - now();
        if (left <= 0)
            return 0;
        int n = poll(p, 2, (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) {
            snprintf(err, errlen, "channel 0: %s", strerror(errno));
            return -1;
        }
        if (n > 0 && p[1].revents)
            return 2;
    }
}

/* The source: GO (paused: the pair stays paused) on channel 0; 0, or -1 with err */
int dp_out_go(struct dp_out *o, int paused, char *err, size_t errlen)
{
    return handoff_write(&o->conn, GO_MAGIC, paused ? GO_PAUSED : 0, "GO", err, errlen);
}

/* Once every channel has read its FINAL sync, channel 0 (with dp_receiver_set_handoff) is
 * taken from the receiver, whose close and free no longer touch it: its TLS session on a
 * descriptor of its own (hand_over). NULL with err when the channel is not there to take
 * (not a handoff, the receiver failed, FINAL not read, or taken before). */
struct dp_handoff *dp_receiver_handoff(struct dp_receiver *r, char *err, size_t errlen)
{
    struct dp_channel *ch = &r->channels[0];
    struct timespec until = deadline_after(CLOCK_REALTIME, 1.0);
    pthread_mutex_lock(&r->lock);
    while (r->handoff && ch->started && ch->final && !ch->handed && !failed(&r->err) && !r->closing)
        if (pthread_cond_timedwait(&r->cv, &r->lock, &until) == ETIMEDOUT)
            break;
    struct dp_handoff *h = failed(&r->err) || r->closing ? NULL : ch->handoff;
    if (h)
        ch->handoff = NULL;
    pthread_mutex_unlock(&r->lock);
    if (!h)
        snprintf(err, errlen, "channel 0 carries no handoff");
    return h;
}

void dp_receiver_set_handoff(struct dp_receiver *r)
{
    r->handoff = 1;
}

int dp_handoff_fd(struct dp_handoff *h)
{
    return h->conn.fd;
}

/* READY to the source; 0, or -1 with err */
int dp_handoff_ready(struct dp_handoff *h, char *err, size_t errlen)
{
    return handoff_write(&h->conn, READY_MAGIC, 0, "READY", err, errlen);
}

/* GO, without waiting: 1 it came (*paused set), 0 not yet (whole), -1 the channel ended or
 * carried anything but GO */
int dp_handoff_go(struct dp_handoff *h, int *paused, char *err, size_t errlen)
{
    uint32_t flags = 0;
    int rc = handoff_take(&h->conn, &h->msg, GO_MAGIC, 0, GO_PAUSED, "GO", &flags, err, errlen);
    if (rc == 1)
        *paused = (flags & GO_PAUSED) != 0;
    return rc;
}

/* ANSWER to the source: 1 running, 2 paused, 3 refused (it never ran); 0, or -1 with err */
int dp_handoff_answer(struct dp_handoff *h, uint32_t code, char *err, size_t errlen)
{
    return handoff_write(&h->conn, ANSWER_MAGIC, code, "ANSWER", err, errlen);
}

/* After ANSWER: the writing half ended (TLS close_notify, then a TCP shutdown for writing)
 * and what has come since (a GO that crossed the answer) read and dropped, so that closing
 * the channel later does not reset the connection before the source has read the answer */
void dp_handoff_finish(struct dp_handoff *h)
{
    if (h->conn.ssl)
        close_notify(&h->conn);
    shutdown(h->conn.fd, SHUT_WR);
    uint8_t drop[4096];
    while (recv(h->conn.fd, drop, sizeof drop, MSG_DONTWAIT) > 0)
        ;
}

void dp_handoff_free(struct dp_handoff *h)
{
    if (!h)
        return;
    if (h->conn.ssl)
        SSL_free(h->conn.ssl);
    close(h->conn.fd);
    free(h);
}
