"""cffi (API mode) build of migrate.dataplane._dataplane: dataplane.c with OpenSSL (TLS on
the data channels), zstd, libxxhash (XXH3-128) and zlib (CRC-32), the system's libraries
(Debian: libssl-dev libzstd-dev libxxhash-dev zlib1g-dev; `make setup` installs them).
cffi releases the GIL around every call: the threads dataplane.c starts never take it."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = r"""
struct dp_out;
struct dp_sender;
struct dp_receiver;
struct dp_round_stats {
    uint64_t batches, pages, zero_pages, data_pages, bytes;
    uint64_t zstd_batches, raw_batches, zstd_in, zstd_out;
    double seconds, encode_seconds, write_seconds;
};
struct dp_sync_info {
    uint64_t records, pages, offset;
    uint8_t digest[16];
};
struct dp_channel_summary {
    uint32_t index, rounds, final, reserved;
    uint64_t records, pages, bytes;
    uint8_t digest[16];
};

uint32_t dp_crc32(uint32_t crc, const uint8_t *p, size_t len);
void *dp_tls_context(int server, const char *ca, const char *cert, const char *key, char *err, size_t errlen);
void dp_tls_context_free(void *ctx);

struct dp_out *dp_out_new(int fd, void *tls_ctx, const char *host, double timeout, double handshake,
                          char *err, size_t errlen);
void dp_out_free(struct dp_out *o);
int dp_out_write(struct dp_out *o, const uint8_t *buf, size_t len, uint64_t records, uint64_t pages,
                 char *err, size_t errlen);
void dp_out_state(struct dp_out *o, uint64_t *records, uint64_t *pages, uint64_t *offset,
                  uint8_t digest[16], double *write_seconds);
int dp_out_channel_header(struct dp_out *o, uint32_t version, uint32_t index, const uint8_t token[32],
                          char *err, size_t errlen);
int dp_out_sync(struct dp_out *o, uint32_t round, int final, char *err, size_t errlen);

struct dp_sender *dp_sender_new(struct dp_out **outs, int nouts, int nworkers, double rate,
                                char *err, size_t errlen);
int dp_sender_set_space(struct dp_sender *s, uint32_t space, uint32_t n, const uint64_t *first,
                        const uint64_t *count, uint8_t *const *base, char *err, size_t errlen);
void dp_sender_set_rate(struct dp_sender *s, double rate);
int dp_sender_round(struct dp_sender *s, uint32_t nspaces, const uint32_t *spaces,
                    const uint64_t *const *pfns, const uint64_t *counts, int mode, int level, int stable,
                    int64_t sync, int final, struct dp_round_stats *st, struct dp_sync_info *synced,
                    char *err, size_t errlen);
void dp_sender_cancel(struct dp_sender *s, int shutdown_sockets);
void dp_sender_free(struct dp_sender *s);

struct dp_receiver *dp_receiver_new(int nchannels, uint32_t version, const uint8_t token[32], void *tls_ctx,
                                    double timeout, double handshake, char *err, size_t errlen);
int dp_receiver_set_space(struct dp_receiver *r, uint32_t space, uint32_t n, const uint64_t *first,
                          const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                          char *err, size_t errlen);
struct dp_target;
struct dp_target *dp_target_new(int slots, char *err, size_t errlen);
int dp_target_set_space(struct dp_target *t, uint32_t space, uint32_t n, const uint64_t *first,
                        const uint64_t *count, uint8_t *const *base, const int *fds, const uint64_t *fd_offs,
                        char *err, size_t errlen);
int dp_target_decode(struct dp_target *t, int slot, uint32_t type, const uint8_t *body, uint32_t len,
                     char *err, size_t errlen);
int dp_target_write(struct dp_target *t, int slot, uint64_t turn, uint32_t *npages, uint32_t *nzero,
                    char *err, size_t errlen);
int dp_target_fail(struct dp_target *t, uint64_t turn);
void dp_target_stop(struct dp_target *t);
void dp_target_free(struct dp_target *t);
int dp_receiver_add(struct dp_receiver *r, int index, int fd, char *err, size_t errlen);
void dp_receiver_open(struct dp_receiver *r);
void dp_receiver_set_cap(struct dp_receiver *r, uint64_t cap);
uint64_t dp_receiver_bytes(struct dp_receiver *r);
int dp_receiver_wait(struct dp_receiver *r, uint32_t round, int final, double timeout, char *err, size_t errlen);
void dp_receiver_summary(struct dp_receiver *r, struct dp_channel_summary *out, double *place_seconds,
                         uint64_t *placed_bytes);
int dp_receiver_error(struct dp_receiver *r, char *err, size_t errlen);
void dp_receiver_close(struct dp_receiver *r);
void dp_receiver_free(struct dp_receiver *r);

struct dp_handoff;
int dp_out_handoff(struct dp_out *o, int kind, int also, double timeout, uint32_t *value,
                   char *err, size_t errlen);
int dp_out_go(struct dp_out *o, int paused, char *err, size_t errlen);
void dp_receiver_set_handoff(struct dp_receiver *r);
struct dp_handoff *dp_receiver_handoff(struct dp_receiver *r, char *err, size_t errlen);
int dp_handoff_fd(struct dp_handoff *h);
int dp_handoff_ready(struct dp_handoff *h, char *err, size_t errlen);
int dp_handoff_go(struct dp_handoff *h, int *paused, char *err, size_t errlen);
int dp_handoff_answer(struct dp_handoff *h, uint32_t code, char *err, size_t errlen);
void dp_handoff_finish(struct dp_handoff *h);
void dp_handoff_free(struct dp_handoff *h);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "migrate.dataplane._dataplane",
    (HERE / "dataplane.c").read_text(),
    libraries=["ssl", "crypto", "zstd", "xxhash", "z", "pthread"],
    include_dirs=[str(HERE)],           # dataplane.c's "../stream/crc32_fold.h", from the build dir
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-sign-compare"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent.parent), verbose=False)
