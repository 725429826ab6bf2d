/* memset/memcpy (the compiler may call them) and console formatting. */
#include "rt.h"

void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

struct out { char *buf; size_t size, len; };

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_num(struct out *o, uint64_t v, unsigned base, int width, char pad, int neg)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (n < width--)
        put(o, pad);
    while (n)
        put(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            while (*s)
                put(&o, *s++);
            break;
        }
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_num(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            put_num(&o, v, *fmt == 'x' ? 16 : 10, width, pad, 0);
            break;
        }
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '?');
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

/* A 16550A driver's transmit: wait for THRE, then fill the 16-byte FIFO
 * with one `rep outsb`. */
static void uart_write(const char *s, size_t n)
{
    while (n) {
        while (!(inb(UART_PORT + 5) & 0x20))
            cpu_relax();
        size_t chunk = n < 16 ? n : 16;
        n -= chunk;
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(chunk) : "d"(UART_PORT) : "memory");
    }
}

/* One line at a time on the console, whichever vCPU (and ring) prints: the
 * owner is a vCPU index, -1 when free.  A vCPU that already owns it (an
 * exception while printing) goes on without waiting. */
static volatile int32_t console_owner = -1;

void console_write(const char *s, size_t n)
{
    int32_t me = (int32_t)cpu_index(), free = -1;
    int taken = 0;
    if (console_owner != me) {
        while (!__atomic_compare_exchange_n(&console_owner, &free, me, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED)) {
            free = -1;
            cpu_relax();
        }
        taken = 1;
    }
    if (boot && (boot->flags & BOOT_F_UART))
        uart_write(s, n);
    else
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"(PORT_CONSOLE) : "memory");
    if (taken)
        __atomic_store_n(&console_owner, -1, __ATOMIC_RELEASE);
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

void printk(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    console_write(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

void delay_ms(uint64_t ms)
{
    uint64_t start = rdtsc(), cycles = boot->tsc_khz * ms;
    while (rdtsc() - start < cycles)
        cpu_relax();
}
