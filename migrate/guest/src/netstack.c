/* A tiny IPv4 stack on the virtio-net driver, run from ring 3
 * (specs/guest-boot.md, "netecho"): ARP replies, ICMP echo replies, and UDP
 * services: echo (port 7, with a check of netseq's sequence numbers),
 * discard (9), status (10: a line of counters) and blast (19: sends the asker
 * a stream of numbered datagrams).  Replies go back to the sender's MAC
 * address: there is no ARP cache and no routing. */
#include "rt.h"

#define ETH_HLEN 14
#define PORT_ECHO 7
#define PORT_DISCARD 9
#define PORT_STATUS 10
#define PORT_BLAST 19
#define NETSEQ_MAGIC 0x484E5351u        /* "HNSQ" in network order */
#define SEQ_WINDOW 4096

struct counters {
    uint64_t rx, tx, bytes_in, bytes_out, arp, icmp, echo, discard, blast, status;
    uint64_t bad, ignored, seq_max, seq_count, seq_dups, seq_late;
};
static struct counters cnt;
static uint32_t my_ip;                  /* host byte order */
static int up;
static uint64_t seq_seen[SEQ_WINDOW / 64];  /* bit s % SEQ_WINDOW: seq s arrived (s > seq_max - SEQ_WINDOW) */

static int same_mac(const uint8_t *a, const uint8_t *b)
{
    for (int i = 0; i < 6; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

static uint64_t sum16(const uint8_t *p, uint32_t n, uint64_t sum)
{
    for (uint32_t i = 0; i + 1 < n; i += 2)
        sum += get16(p + i);
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    return sum;
}

static uint16_t fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)sum;
}

static uint64_t pseudo(const uint8_t *ip, uint32_t len)
{
    return sum16(ip + 12, 8, 0) + 17 + len;
}

/* Start a reply frame in a TX buffer: Ethernet header back to the sender. */
static uint8_t *reply_frame(const uint8_t *rx_frame, uint16_t type)
{
    uint8_t *buf = vnet_tx_buf();
    memset(buf, 0, VNET_HDR);
    uint8_t *f = buf + VNET_HDR;
    memcpy(f, rx_frame + 6, 6);
    memcpy(f + 6, vnet_mac, 6);
    put16(f + 12, type);
    return f;
}

static void send(uint32_t frame_len)
{
    vnet_tx_send(VNET_HDR + frame_len);
    cnt.tx++;
    cnt.bytes_out += frame_len;
}

static void ip_header(uint8_t *ip, const uint8_t *rx_ip, uint32_t total, uint8_t proto)
{
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint16_t)total);
    put16(ip + 4, (uint16_t)cnt.tx);
    put16(ip + 6, 0x4000);              /* don't fragment */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    memcpy(ip + 16, rx_ip + 12, 4);     /* to the sender */
    put16(ip + 10, (uint16_t)~fold(sum16(ip, 20, 0)));
}

static void arp(const uint8_t *f, uint32_t len)
{
    const uint8_t *a = f + ETH_HLEN;
    if (len < ETH_HLEN + 28 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4
        || get16(a + 6) != 1 || get32(a + 24) != my_ip) {
        cnt.ignored++;
        return;
    }
    cnt.arp++;
    uint8_t *r = reply_frame(f, 0x0806) + ETH_HLEN;
    put16(r, 1);
    put16(r + 2, 0x0800);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, 2);
    memcpy(r + 8, vnet_mac, 6);
    put32(r + 14, my_ip);
    memcpy(r + 18, a + 8, 10);          /* the asker's MAC and IP */
    send(ETH_HLEN + 28);
}

static void icmp(const uint8_t *f, const uint8_t *ip, uint32_t ihl, uint32_t total)
{
    const uint8_t *m = ip + ihl;
    uint32_t n = total - ihl;
    if (n < 8 || m[0] != 8 || fold(sum16(m, n, 0)) != 0xFFFF || ETH_HLEN + 20 + n > VNET_BUF - VNET_HDR) {
        if (n >= 8 && m[0] == 8)
            cnt.bad++;
        else
            cnt.ignored++;
        return;
    }
    cnt.icmp++;
    uint8_t *r = reply_frame(f, 0x0800);
    uint8_t *rip = r + ETH_HLEN, *rm = rip + 20;
    memcpy(rm, m, n);
    rm[0] = 0;                          /* echo reply */
    put16(rm + 2, 0);
    put16(rm + 2, (uint16_t)~fold(sum16(rm, n, 0)));
    ip_header(rip, ip, 20 + n, 1);
    send(ETH_HLEN + 20 + n);
}

/* Fill in a UDP header and checksum (or leave it to the device). */
static void udp_out(uint8_t *buf, uint8_t *ip, uint16_t sport, uint16_t dport, uint32_t payload)
{
    uint8_t *u = ip + 20;
    uint32_t ulen = 8 + payload;
    put16(u, sport);
    put16(u + 2, dport);
    put16(u + 4, (uint16_t)ulen);
    put16(u + 6, 0);
    struct vnet_hdr *h = (struct vnet_hdr *)buf;
    if (vnet_features & 1) {            /* VIRTIO_NET_F_CSUM: the pseudo-header sum, the rest by the device */
        put16(u + 6, fold(pseudo(ip, ulen)));
        h->flags = VNET_F_CSUM_OK;
        h->csum_start = ETH_HLEN + 20;
        h->csum_offset = 6;
    } else {
        uint16_t c = (uint16_t)~fold(sum16(u, ulen, pseudo(ip, ulen)));
        put16(u + 6, c ? c : 0xFFFF);
    }
}

static void seq_note(uint64_t seq)
{
    cnt.seq_count++;
    if (cnt.seq_count > 1 && seq + SEQ_WINDOW <= cnt.seq_max) {
        cnt.seq_late++;                 /* too old to tell */
        return;
    }
    if (cnt.seq_count == 1 || seq > cnt.seq_max) {
        uint64_t from = cnt.seq_count == 1 ? seq : cnt.seq_max + 1;
        if (seq - from >= SEQ_WINDOW)
            from = seq - SEQ_WINDOW + 1;
        for (uint64_t s = from; s <= seq; s++)      /* forget what the window slides over */
            seq_seen[(s % SEQ_WINDOW) / 64] &= ~(1ULL << (s % 64));
        cnt.seq_max = seq;
    }
    uint64_t bit = 1ULL << (seq % 64), *word = &seq_seen[(seq % SEQ_WINDOW) / 64];
    if (*word & bit)
        cnt.seq_dups++;
    *word |= bit;
}

static void blast(const uint8_t *f, const uint8_t *ip, const uint8_t *u, uint32_t n)
{
    if (n < 8)
        return;
    uint32_t count = (uint32_t)u[8] | (uint32_t)u[9] << 8 | (uint32_t)u[10] << 16 | (uint32_t)u[11] << 24;
    uint32_t size = (uint32_t)u[12] | (uint32_t)u[13] << 8 | (uint32_t)u[14] << 16 | (uint32_t)u[15] << 24;
    uint32_t most = vnet_mtu - 28u;
    if (size < 8)
        size = 8;
    if (size > most)
        size = most;
    if (count > 10000000)
        count = 10000000;
    cnt.blast++;
    uint64_t kicks = vnet_kicks, t0 = rdtsc();
    for (uint32_t k = 0; k < count; k++) {
        uint8_t *buf = vnet_tx_buf();
        memset(buf, 0, VNET_HDR);
        uint8_t *r = buf + VNET_HDR;
        memcpy(r, f + 6, 6);
        memcpy(r + 6, vnet_mac, 6);
        put16(r + 12, 0x0800);
        uint8_t *rip = r + ETH_HLEN, *p = rip + 28;
        put32(p, NETSEQ_MAGIC);
        put32(p + 4, k);
        for (uint32_t i = 8; i < size; i++)
            p[i] = (uint8_t)(k + i);
        ip_header(rip, ip, 28 + size, 17);
        udp_out(buf, rip, PORT_BLAST, get16(u), size);
        send(ETH_HLEN + 28 + size);
        if ((k & 31) == 31)
            vnet_flush();
    }
    vnet_flush();
    printk("netecho blast n=%u size=%u cycles=%lu kicks=%lu\n", count, size, rdtsc() - t0,
           vnet_kicks - kicks);
}

static void status(const uint8_t *f, const uint8_t *ip, const uint8_t *u)
{
    cnt.status++;
    uint8_t *r = reply_frame(f, 0x0800);
    uint8_t *rip = r + ETH_HLEN, *p = rip + 28;
    int n = snprintf((char *)p, 512,
                      "rx=%lu tx=%lu bytes_in=%lu arp=%lu icmp=%lu echo=%lu discard=%lu bad=%lu "
                      "seq_max=%lu seq_count=%lu seq_dups=%lu seq_late=%lu kicks=%lu irqs=%lu",
                      cnt.rx, cnt.tx, cnt.bytes_in, cnt.arp, cnt.icmp, cnt.echo, cnt.discard, cnt.bad,
                      cnt.seq_max, cnt.seq_count, cnt.seq_dups, cnt.seq_late, vnet_kicks, net_irqs);
    if (n > 511)
        n = 511;
    ip_header(rip, ip, 28 + (uint32_t)n, 17);
    udp_out(r - VNET_HDR, rip, PORT_STATUS, get16(u), (uint32_t)n);
    send(ETH_HLEN + 28 + (uint32_t)n);
}

static void udp(const uint8_t *f, const uint8_t *ip, uint32_t ihl, uint32_t total, uint8_t flags)
{
    const uint8_t *u = ip + ihl;
    uint32_t ulen = get16(u + 4);
    if (total - ihl < 8 || ulen < 8 || ulen > total - ihl) {
        cnt.bad++;
        return;
    }
    /* A checksum the device or host vouches for, or none, is not checked again. */
    if (!(flags & 3) && get16(u + 6) && fold(sum16(u, ulen, pseudo(ip, ulen))) != 0xFFFF) {
        cnt.bad++;
        return;
    }
    uint16_t dport = get16(u + 2);
    uint32_t n = ulen - 8;
    switch (dport) {
    case PORT_ECHO: {
        if (n >= 12 && get32(u + 8) == NETSEQ_MAGIC)
            seq_note((uint64_t)get32(u + 12) << 32 | get32(u + 16));
        if (ETH_HLEN + 28 + n > VNET_BUF - VNET_HDR)
            return;
        cnt.echo++;
        uint8_t *r = reply_frame(f, 0x0800);
        uint8_t *rip = r + ETH_HLEN;
        memcpy(rip + 28, u + 8, n);
        ip_header(rip, ip, 28 + n, 17);
        udp_out(r - VNET_HDR, rip, PORT_ECHO, get16(u), n);
        send(ETH_HLEN + 28 + n);
        return;
    }
    case PORT_DISCARD:
        cnt.discard++;
        return;
    case PORT_STATUS:
        status(f, ip, u);
        return;
    case PORT_BLAST:
        blast(f, ip, u, n);
        return;
    default:
        cnt.ignored++;
    }
}

static void ipv4(const uint8_t *f, uint32_t len, uint8_t flags)
{
    const uint8_t *ip = f + ETH_HLEN;
    if (len < ETH_HLEN + 20) {
        cnt.bad++;
        return;
    }
    uint32_t ihl = (ip[0] & 15) * 4u, total = get16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl || total > len - ETH_HLEN
        || fold(sum16(ip, ihl, 0)) != 0xFFFF) {
        cnt.bad++;
        return;
    }
    if (get32(ip + 16) != my_ip || (get16(ip + 6) & 0x3FFF)) {  /* not ours, or a fragment */
        cnt.ignored++;
        return;
    }
    if (ip[9] == 1)
        icmp(f, ip, ihl, total);
    else if (ip[9] == 17)
        udp(f, ip, ihl, total, flags);
    else
        cnt.ignored++;
}

int net_init(uint32_t ip, uint64_t opts)
{
    if (!ip || vnet_init(opts) < 0)
        return -1;
    my_ip = ip;
    up = 1;
    return 0;
}

void net_poll(void)
{
    if (!up)
        return;
    uint32_t len;
    uint16_t id;
    uint8_t *buf;
    int any = 0;
    while ((buf = vnet_rx_next(&len, &id)) != 0) {
        any = 1;
        cnt.rx++;
        if (len >= VNET_HDR + ETH_HLEN) {
            const uint8_t *f = buf + VNET_HDR;
            uint32_t flen = len - VNET_HDR;
            cnt.bytes_in += flen;
            static const uint8_t broadcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
            if (!same_mac(f, vnet_mac) && !same_mac(f, broadcast))
                cnt.ignored++;
            else if (get16(f + 12) == 0x0806)
                arp(f, flen);
            else if (get16(f + 12) == 0x0800)
                ipv4(f, flen, buf[0]);
            else
                cnt.ignored++;
        }
        vnet_rx_done(id);
    }
    if (any)
        vnet_flush();
}

void net_report(const char *who)
{
    printk("%s net rx=%lu tx=%lu arp=%lu icmp=%lu echo=%lu discard=%lu bad=%lu seq_max=%lu "
           "seq_dups=%lu seq_late=%lu kicks=%lu irqs=%lu ticks=%lu\n", who, cnt.rx, cnt.tx, cnt.arp,
           cnt.icmp, cnt.echo, cnt.discard, cnt.bad, cnt.seq_max, cnt.seq_dups, cnt.seq_late, vnet_kicks,
           net_irqs, timer_ticks);
}
