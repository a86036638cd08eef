/*
 * wsload: securepub's load generator. One scenario against one server, one
 * JSON line on stdout; progress and errors on stderr.
 *
 *   wsload --scenario fanout --target ours --port 9443 --ca ca.pem \
 *          --api-key KEY --server-pid PID --subscribers 1000 --mode flood
 *
 * Single-threaded epoll loop over non-blocking sockets and OpenSSL. It speaks
 * just enough HTTP/1.1 (keep-alive POSTs for tickets and publishes) and
 * WebSocket (client handshake, masked text frames out, unmasked frames in,
 * pong) to drive the server, so that it costs far less CPU than the server
 * it measures. Every message's send time is embedded in its payload
 * ({"t":<ns>,"pad":"x..."}): publisher and subscribers share this process's
 * monotonic clock. All traffic goes to 127.0.0.1; every phase is bounded in
 * time, and --timeout bounds the whole run.
 *
 * Build: cc -O2 -o wsload wsload.c -lssl -lcrypto   (bench/run.py does it)
 *
 * Options for the connect scenario used by bench/connections.py (all off by
 * default): --source 127.0.0.N binds every socket to that local address
 * (more than ~28k connections to one port need several) and asks for
 * tickets bound to it; --subscribe-mode same|distinct subscribes every
 * connection to --topic (or to <topic>.<index>) once open; --hold 1 keeps
 * the connections open after the JSON line, answering pings, until stdin
 * reaches end of file (so several generators can hold 50k together).
 *
 * --retry N (connect scenario, off by default; used by bench/storm.py)
 * retries each connection up to N times when its ticket request or its
 * handshake is refused with 429 or 503, waiting the answer's Retry-After
 * (1 s without one) plus up to a quarter more at random, or when the server
 * drops it before answering (1 s, same jitter); every retry asks for a
 * fresh ticket, as a browser reconnecting would. With --hold 1 the second
 * JSON line counts the refusals by cause (refused_503, refused_429,
 * refused_other: handshake answers; dropped: no answer; ticket_503,
 * ticket_429, ticket_other) and the retries, and once released a third
 * line counts the connections closed while held and the close frames
 * received (close_1001; close_other: another code, or none).
 * --ticket-connections N (4 by default, at most 64) is how many kept-alive
 * HTTPS connections ask for tickets, one request at a time each.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ options */

static struct {
    const char *scenario, *target, *host, *ca, *api_key, *mode, *topic, *source, *subscribe_mode;
    int port, server_pid, subscribers, connections, publishers, payload_bytes, concurrency, hold,
        retry, ticket_connections;
    double rate, duration, warmup, drain, settle, timeout;
} opt = {
    .scenario = "fanout", .target = "ours", .host = "127.0.0.1", .ca = "", .api_key = "",
    .mode = "flood", .topic = "bench.fanout", .source = "", .subscribe_mode = "none",
    .port = 0, .server_pid = 0, .hold = 0, .retry = 0, .ticket_connections = 4,
    .subscribers = 1000, .connections = 10000, .publishers = 16, .payload_bytes = 200,
    .concurrency = 32, .rate = 10, .duration = 10, .warmup = 2, .drain = 15, .settle = 2,
    .timeout = 120,
};

static int ours;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[wsload] ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[wsload %s %s] ", opt.target, opt.scenario);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || i + 1 >= argc) die("bad argument %s", a);
        const char *v = argv[++i];
        const char *n = a + 2;
#define S(name, field) if (!strcmp(n, name)) { opt.field = v; continue; }
#define I(name, field) if (!strcmp(n, name)) { opt.field = atoi(v); continue; }
#define D(name, field) if (!strcmp(n, name)) { opt.field = atof(v); continue; }
        S("scenario", scenario) S("target", target) S("host", host) S("ca", ca)
        S("api-key", api_key) S("mode", mode) S("topic", topic) S("source", source)
        S("subscribe-mode", subscribe_mode) I("hold", hold) I("retry", retry)
        I("ticket-connections", ticket_connections)
        I("port", port) I("server-pid", server_pid) I("subscribers", subscribers)
        I("connections", connections) I("publishers", publishers)
        I("payload-bytes", payload_bytes) I("concurrency", concurrency)
        D("rate", rate) D("duration", duration) D("warmup", warmup) D("drain", drain)
        D("settle", settle) D("timeout", timeout)
        die("unknown option %s", a);
    }
    ours = !strcmp(opt.target, "ours");
}

/* ------------------------------------------------------------------ time, /proc */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t started_ns;

static double proc_cpu(int pid) { /* utime + stime, seconds */
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return NAN;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return NAN;
    p += 2;
    unsigned long long ut = 0, st = 0;
    /* fields after ')': state(3) ... utime is the 14th field overall, 12th here */
    for (int field = 3; field < 14 && p; field++) p = strchr(p, ' ') ? strchr(p, ' ') + 1 : NULL;
    if (!p || sscanf(p, "%llu %llu", &ut, &st) != 2) return NAN;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static long rss_kib(int pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kib = atol(line + 6);
    fclose(f);
    return kib;
}

static struct { int64_t t0; double server0, self0; } meter;
static struct { double wall_s, server_cpu, generator_cpu; } cpu_result;

static void meter_start(void) {
    meter.t0 = now_ns();
    meter.server0 = opt.server_pid ? proc_cpu(opt.server_pid) : 0;
    meter.self0 = self_cpu();
}

static void meter_stop(void) {
    double wall = (now_ns() - meter.t0) / 1e9;
    cpu_result.wall_s = wall;
    cpu_result.server_cpu = opt.server_pid ? (proc_cpu(opt.server_pid) - meter.server0) / wall : NAN;
    cpu_result.generator_cpu = (self_cpu() - meter.self0) / wall;
}

/* The runner starts and stops its profiler on these lines. */
static void mark(const char *what) {
    fprintf(stderr, "@@%s\n", what);
    fflush(stderr);
}

/* ------------------------------------------------------------------ histogram */

/* Log-linear over microseconds: exact below 1024 us, then 128 buckets per power of two. */
#define SUB 128
#define NBUCKETS (1024 + 27 * SUB)
static double hist[NBUCKETS];
static uint64_t hist_n;
static double hist_max;

static void hist_record(double us) {
    if (us < 0) us = 0;
    if (us > hist_max) hist_max = us;
    uint64_t v = (uint64_t)us;
    int index;
    if (v < 1024) index = (int)v;
    else {
        int e = 63 - __builtin_clzll(v);
        int sub = (int)((v - (1ULL << e)) / ((1ULL << e) / SUB));
        index = 1024 + (e - 10) * SUB + sub;
        if (index >= NBUCKETS) index = NBUCKETS - 1;
    }
    hist[index]++;
    hist_n++;
}

static double hist_value(int index) {
    if (index < 1024) return index;
    int e = 10 + (index - 1024) / SUB, sub = (index - 1024) % SUB;
    return ldexp(1, e) + (sub + 0.5) * ldexp(1, e) / SUB;
}

static double hist_pct(double p) {
    if (!hist_n) return NAN;
    double rank = ceil(p / 100.0 * hist_n), seen = 0;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank) return hist_value(i);
    }
    return hist_max;
}

/* ------------------------------------------------------------------ connections */

enum kind { K_WS, K_HTTP };
enum state { S_CONNECTING, S_TLS, S_REQUEST, S_OPEN, S_DEAD };

typedef struct conn conn;
typedef void (*http_cb)(conn *c, int status, const char *body, size_t len, void *arg);

struct conn {
    int fd, kind, state, index, want_out;
    int status, retry_after; /* a refused handshake's status and Retry-After (-1: none) */
    SSL *ssl;
    char *rbuf;
    size_t rlen, rcap;
    char *wbuf; /* plaintext not yet taken by SSL_write */
    size_t wlen, wcap;
    char key[32]; /* Sec-WebSocket-Key */
    char *ticket;
    /* HTTP */
    int busy;
    http_cb cb;
    void *cb_arg;
    /* WebSocket */
    int subscribed;
    uint32_t received;
};

static SSL_CTX *ctx;
static int ep;
static struct sockaddr_in server_addr;
static struct sockaddr_in source_addr; /* --source: sin_family 0 when unset */

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
static char first_error[300];
static int errors;

static void record_error(const char *fmt, ...) {
    errors++;
    if (first_error[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(first_error, sizeof first_error, fmt, ap);
    va_end(ap);
}

static void ws_on_open(conn *c);
static void ws_on_text(conn *c, const char *p, size_t n);
static void ws_on_dead(conn *c);
static void conn_flush(conn *c);

static void set_events(conn *c, int out) {
    if (c->want_out == out) return;
    c->want_out = out;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static conn *conn_new(int kind, int index) {
    conn *c = calloc(1, sizeof *c);
    c->kind = kind;
    c->index = index;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (source_addr.sin_family) { /* the port is picked at connect(), per destination */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&source_addr, sizeof source_addr) < 0)
            die("bind %s: %s", opt.source, strerror(errno));
    }
    c->state = S_CONNECTING;
    c->retry_after = -1;
    int r = connect(c->fd, (struct sockaddr *)&server_addr, sizeof server_addr);
    if (r < 0 && errno != EINPROGRESS) die("connect: %s", strerror(errno));
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    c->want_out = 1;
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->rcap = 16384;
    c->rbuf = malloc(c->rcap);
    return c;
}

static void conn_close(conn *c) {
    if (c->state == S_DEAD) return;
    c->state = S_DEAD;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) SSL_free(c->ssl);
    c->ssl = NULL;
    close(c->fd);
    free(c->rbuf);
    c->rbuf = NULL;
    free(c->wbuf);
    c->wbuf = NULL;
    c->rlen = c->wlen = 0;
}

static void conn_fail(conn *c, const char *why) {
    if (c->state == S_DEAD) return;
    int was_open = c->state == S_OPEN;
    record_error("%s %d: %s", c->kind == K_WS ? "ws" : "http", c->index, why);
    conn_close(c);
    if (c->kind == K_WS) {
        if (!was_open) ws_on_dead(c);
    } else if (c->busy && c->cb) {
        c->busy = 0;
        c->cb(c, 0, "", 0, c->cb_arg);
    }
}

static void conn_write(conn *c, const void *data, size_t n) {
    if (c->wlen + n > c->wcap) {
        c->wcap = (c->wlen + n) * 2;
        c->wbuf = realloc(c->wbuf, c->wcap);
    }
    memcpy(c->wbuf + c->wlen, data, n);
    c->wlen += n;
    if (c->state == S_REQUEST || c->state == S_OPEN) conn_flush(c);
}

static void conn_flush(conn *c) {
    while (c->wlen) {
        int r = SSL_write(c->ssl, c->wbuf, (int)c->wlen);
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                set_events(c, 1);
                return;
            }
            conn_fail(c, "write failed");
            return;
        }
        memmove(c->wbuf, c->wbuf + r, c->wlen - r);
        c->wlen -= r;
    }
    set_events(c, 0);
}

/* ------------------------------------------------------------------ HTTP requests */

static void ws_send_upgrade(conn *c) {
    unsigned char raw[16];
    for (int i = 0; i < 16; i++) raw[i] = (unsigned char)(rand() & 0xff);
    EVP_EncodeBlock((unsigned char *)c->key, raw, 16);
    char req[512];
    int n;
    if (c->ticket)
        n = snprintf(req, sizeof req,
                     "GET /ws HTTP/1.1\r\nHost: localhost:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Protocol: securepub.v1, ticket.%s\r\n\r\n",
                     opt.port, c->key, c->ticket);
    else
        n = snprintf(req, sizeof req,
                     "GET /ws HTTP/1.1\r\nHost: localhost:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Protocol: securepub.v1\r\n\r\n",
                     opt.port, c->key);
    conn_write(c, req, (size_t)n);
}

static void http_post(conn *c, const char *path, const char *body, size_t len, http_cb cb,
                      void *arg) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "POST %s HTTP/1.1\r\nHost: localhost:%d\r\nAuthorization: Bearer %s\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     path, opt.port, opt.api_key, len);
    c->busy = 1;
    c->cb = cb;
    c->cb_arg = arg;
    conn_write(c, head, (size_t)n);
    conn_write(c, body, len);
}

/* ------------------------------------------------------------------ frames */

static uint32_t rng = 2463534242u;
static uint32_t xorshift(void) {
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

static void ws_send(conn *c, int opcode, const char *p, size_t n) {
    unsigned char frame[256 + 14];
    if (n > 256) n = 256;
    size_t h = 2;
    frame[0] = 0x80 | opcode;
    if (n < 126) frame[1] = 0x80 | n;
    else {
        frame[1] = 0x80 | 126;
        frame[2] = n >> 8;
        frame[3] = n & 0xff;
        h = 4;
    }
    uint32_t m = xorshift();
    memcpy(frame + h, &m, 4);
    unsigned char *mask = frame + h;
    for (size_t i = 0; i < n; i++) frame[h + 4 + i] = p[i] ^ mask[i & 3];
    conn_write(c, frame, h + 4 + n);
}

static int close_1001, close_other; /* close frames received, by code */

/* Parse complete frames from c->rbuf; returns bytes consumed. */
static size_t ws_parse(conn *c) {
    const unsigned char *b = (const unsigned char *)c->rbuf;
    size_t len = c->rlen, off = 0;
    while (len - off >= 2 && c->state == S_OPEN) {
        size_t plen = b[off + 1] & 0x7f, h = 2;
        if (plen == 126) {
            if (len - off < 4) break;
            plen = (size_t)b[off + 2] << 8 | b[off + 3];
            h = 4;
        } else if (plen == 127) {
            if (len - off < 10) break;
            plen = 0;
            for (int i = 2; i < 10; i++) plen = plen << 8 | b[off + i];
            h = 10;
        }
        if (len - off < h + plen) {
            if (h + plen > c->rcap) { /* a frame larger than the buffer: grow it */
                c->rcap = h + plen + 1024;
                c->rbuf = realloc(c->rbuf, c->rcap);
                b = (const unsigned char *)c->rbuf;
            }
            break;
        }
        int opcode = b[off] & 0x0f;
        const char *p = c->rbuf + off + h;
        if (opcode == 1) ws_on_text(c, p, plen);
        else if (opcode == 9) ws_send(c, 10, p, plen);
        else if (opcode == 8) {
            int code = plen >= 2 ? (int)((unsigned char)p[0] << 8 | (unsigned char)p[1]) : 0;
            if (code == 1001) close_1001++;
            else close_other++;
            conn_fail(c, "server closed the WebSocket");
            return 0;
        }
        off += h + plen;
    }
    return off;
}

/* ------------------------------------------------------------------ responses */

static char *find_header_end(conn *c) {
    if (c->rlen < 4) return NULL;
    return memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
}

/* A NUL-terminated response head's Retry-After (whole seconds), -1 without one. */
static int head_retry_after(const char *head) {
    const char *h = strcasestr(head, "\r\nretry-after:");
    return h ? atoi(h + 14) : -1;
}

static void handle_ws_handshake(conn *c) {
    char *end = find_header_end(c);
    if (!end) {
        if (c->rlen > 16000) conn_fail(c, "handshake response too long");
        return;
    }
    size_t head_len = (size_t)(end - c->rbuf) + 4;
    if (strncmp(c->rbuf, "HTTP/1.1 101", 12) != 0) {
        char line[80];
        size_t n = strcspn(c->rbuf, "\r");
        if (n > sizeof line - 1) n = sizeof line - 1;
        memcpy(line, c->rbuf, n);
        line[n] = 0;
        c->status = atoi(c->rbuf + 9);
        c->rbuf[head_len - 1] = 0;
        c->retry_after = head_retry_after(c->rbuf);
        conn_fail(c, line);
        return;
    }
    /* Sec-WebSocket-Accept must be base64(sha1(key + GUID)). */
    char src[128];
    unsigned char digest[20], expect[40];
    int n = snprintf(src, sizeof src, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", c->key);
    SHA1((unsigned char *)src, (size_t)n, digest);
    EVP_EncodeBlock(expect, digest, 20);
    c->rbuf[head_len - 1] = 0;
    if (!strcasestr(c->rbuf, "sec-websocket-accept:") || !strstr(c->rbuf, (char *)expect)) {
        conn_fail(c, "bad Sec-WebSocket-Accept");
        return;
    }
    memmove(c->rbuf, c->rbuf + head_len, c->rlen - head_len);
    c->rlen -= head_len;
    c->state = S_OPEN;
    free(c->ticket);
    c->ticket = NULL;
    ws_on_open(c);
}

static void handle_http_response(conn *c) {
    for (;;) {
        char *end = find_header_end(c);
        if (!end) return;
        size_t head_len = (size_t)(end - c->rbuf) + 4;
        int status = atoi(c->rbuf + 9);
        size_t length = 0;
        char saved = c->rbuf[head_len - 1];
        c->rbuf[head_len - 1] = 0;
        char *cl = strcasestr(c->rbuf, "\r\ncontent-length:");
        if (cl) length = (size_t)atol(cl + 17);
        c->retry_after = head_retry_after(c->rbuf);
        c->rbuf[head_len - 1] = saved;
        if (c->rlen < head_len + length) return;
        char body[1024];
        size_t blen = length < sizeof body - 1 ? length : sizeof body - 1;
        memcpy(body, c->rbuf + head_len, blen);
        body[blen] = 0;
        memmove(c->rbuf, c->rbuf + head_len + length, c->rlen - head_len - length);
        c->rlen -= head_len + length;
        c->busy = 0;
        if (c->cb) c->cb(c, status, body, blen, c->cb_arg);
        if (c->state != S_OPEN) return;
    }
}

/* ------------------------------------------------------------------ the loop */

static void on_tls_ready(conn *c) {
    if (c->kind == K_WS) {
        c->state = S_REQUEST;
        ws_send_upgrade(c);
    } else {
        c->state = S_OPEN;
        conn_flush(c); /* a request queued while connecting */
    }
}

static void do_handshake(conn *c) {
    int r = SSL_connect(c->ssl);
    if (r == 1) {
        on_tls_ready(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) set_events(c, 0);
    else if (e == SSL_ERROR_WANT_WRITE) set_events(c, 1);
    else {
        unsigned long code = ERR_get_error();
        char buf[160];
        ERR_error_string_n(code, buf, sizeof buf);
        conn_fail(c, buf);
    }
}

static void on_event(conn *c, uint32_t events) {
    if (c->state == S_DEAD) return;
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            conn_fail(c, strerror(err));
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN))) return;
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, "localhost");
        SSL_set1_host(c->ssl, "localhost");
        c->state = S_TLS;
        do_handshake(c);
        return;
    }
    if (c->state == S_TLS) {
        do_handshake(c);
        return;
    }
    if (events & EPOLLOUT) conn_flush(c);
    if (c->state == S_DEAD) return;
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    for (;;) {
        if (c->rcap - c->rlen < 4096) {
            c->rcap *= 2;
            c->rbuf = realloc(c->rbuf, c->rcap);
        }
        int r = SSL_read(c->ssl, c->rbuf + c->rlen, (int)(c->rcap - c->rlen - 1));
        if (r <= 0) {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) break;
            if (e == SSL_ERROR_WANT_WRITE) {
                set_events(c, 1);
                break;
            }
            conn_fail(c, e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ? "connection closed"
                                                                               : "read failed");
            return;
        }
        c->rlen += (size_t)r;
        if (c->kind == K_HTTP) {
            handle_http_response(c);
        } else {
            if (c->state == S_REQUEST) handle_ws_handshake(c);
            if (c->state == S_OPEN && c->rlen) {
                size_t used = ws_parse(c);
                if (c->state != S_OPEN) return;
                if (used) {
                    memmove(c->rbuf, c->rbuf + used, c->rlen - used);
                    c->rlen -= used;
                }
            }
        }
        if (c->state == S_DEAD) return;
        /* With read-ahead, OpenSSL has taken all the socket had: if it holds
         * no further record, stop here rather than pay a read() that says
         * EAGAIN (epoll is level-triggered, so nothing is missed). */
        if (!SSL_has_pending(c->ssl)) break;
    }
}

typedef int (*predicate)(void);
typedef void (*tick_fn)(int64_t now);
static tick_fn ticker; /* called every loop turn (rate-mode publishing, --retry) */
static int64_t next_tick_ns = INT64_MAX;

static void check_timeout(void) {
    if (now_ns() - started_ns > (int64_t)(opt.timeout * 1e9)) {
        note("timeout after %.0f s", opt.timeout);
        exit(3);
    }
}

/* Run the loop until `done()` is true or `deadline` (monotonic ns) passes. */
static void run_until(int64_t deadline, predicate done) {
    struct epoll_event evs[512];
    for (;;) {
        check_timeout();
        int64_t now = now_ns();
        if (done && done()) return;
        if (now >= deadline) return;
        if (ticker && now >= next_tick_ns) ticker(now);
        int64_t wake = deadline < next_tick_ns ? deadline : next_tick_ns;
        int ms = (int)((wake - now + 999999) / 1000000);
        if (ms > 100) ms = 100;
        if (ms < 0) ms = 0;
        int n = epoll_wait(ep, evs, 512, ms);
        for (int i = 0; i < n; i++) on_event(evs[i].data.ptr, evs[i].events);
    }
}

/* ------------------------------------------------------------------ HTTP pool */

#define MAX_POOL 64
static conn *pool[MAX_POOL];
static int pool_size;

static conn *pool_idle(void) {
    for (int i = 0; i < pool_size; i++) {
        if (pool[i]->state == S_DEAD) { /* the server closed it: open another */
            free(pool[i]);
            pool[i] = conn_new(K_HTTP, i);
        }
        if (!pool[i]->busy) return pool[i];
    }
    return NULL;
}

static void pool_open(int n) {
    pool_size = n > MAX_POOL ? MAX_POOL : n;
    for (int i = 0; i < pool_size; i++) pool[i] = conn_new(K_HTTP, i);
}

static void pool_close(void) {
    for (int i = 0; i < pool_size; i++) conn_close(pool[i]);
}

/* ------------------------------------------------------------------ ticket + connect tasks */

static conn **wss;   /* the WebSocket connections, by index */
static int ntasks;   /* how many to open */
static int started;  /* tasks started */
static int inflight; /* started, not yet open or failed */
static int opened, failed;
static int *ticket_queue; /* task indexes waiting for an HTTP connection (a ring) */
static int tq_head, tq_tail;
static int *attempts;                      /* --retry: retries used, by task index */
static int64_t *retry_due;                 /* retries waiting: when, */
static int *retry_task, retry_pending;     /* and which task */
static int *retry_ready, rr_head, rr_tail; /* due, waiting for a slot (a ring) */
static int retried;
static int refused_503, refused_429, refused_other, dropped; /* WebSocket handshakes */
static int ticket_503, ticket_429, ticket_other;            /* ticket requests */

static int tickets_only; /* the "tickets" scenario: issue, do not connect */
static void task_done(int ok);
static void start_tasks(void);
static int task_retry(int index, int retryable, int retry_after);

static void start_ws(int index, const char *ticket) {
    if (tickets_only) {
        task_done(1);
        return;
    }
    conn *c = conn_new(K_WS, index);
    c->ticket = ticket ? strdup(ticket) : NULL;
    wss[index] = c;
}

static void on_ticket(conn *h, int status, const char *body, size_t len, void *arg);

static void pump_tickets(void) {
    while (tq_head < tq_tail) {
        conn *h = pool_idle();
        if (!h) return;
        int index = ticket_queue[tq_head++ % ntasks];
        char body[256];
        int n = snprintf(body, sizeof body,
                         "{\"user\":\"bench%d\",\"client_ip\":\"%s\","
                         "\"subscribe\":[\"bench.>\"],\"ttl\":300}",
                         index, opt.source[0] ? opt.source : "127.0.0.1");
        http_post(h, "/v1/tickets", body, (size_t)n, on_ticket, (void *)(intptr_t)index);
    }
}

static void task_done(int ok) {
    inflight--;
    if (ok) opened++;
    else failed++;
}

static void start_tasks(void) {
    while (inflight < opt.concurrency && (rr_head < rr_tail || started < ntasks)) {
        int index = rr_head < rr_tail ? retry_ready[rr_head++ % ntasks] : started++;
        inflight++;
        if (ours) ticket_queue[tq_tail++ % ntasks] = index;
        else start_ws(index, NULL);
    }
    if (ours) pump_tickets();
}

/* --retry: wait as the server asked, then start the task over (a fresh ticket). */
static int task_retry(int index, int retryable, int retry_after) {
    if (!opt.retry || !retryable || attempts[index] >= opt.retry) return 0;
    attempts[index]++;
    retried++;
    inflight--; /* a client waiting to retry costs the server nothing */
    double wait = (retry_after >= 0 ? retry_after : 1) * (1 + 0.25 * (xorshift() / 4294967296.0));
    int64_t due = now_ns() + (int64_t)(wait * 1e9);
    retry_due[retry_pending] = due;
    retry_task[retry_pending++] = index;
    if (due < next_tick_ns) next_tick_ns = due;
    return 1;
}

static void retry_tick(int64_t now) {
    int64_t next = INT64_MAX;
    for (int i = 0; i < retry_pending;) {
        if (retry_due[i] <= now) {
            retry_ready[rr_tail++ % ntasks] = retry_task[i];
            retry_pending--;
            retry_due[i] = retry_due[retry_pending];
            retry_task[i] = retry_task[retry_pending];
        } else {
            if (retry_due[i] < next) next = retry_due[i];
            i++;
        }
    }
    next_tick_ns = next;
    start_tasks();
}

static void on_ticket(conn *h, int status, const char *body, size_t len, void *arg) {
    (void)h;
    (void)len;
    int index = (int)(intptr_t)arg;
    const char *t = strstr(body, "\"ticket\":\"");
    if (status != 201 || !t) {
        record_error("ticket: HTTP %d %.120s", status, body);
        if (status == 503) ticket_503++;
        else if (status == 429) ticket_429++;
        else ticket_other++;
        int retryable = status == 0 || status == 429 || status == 503;
        if (!task_retry(index, retryable, status ? h->retry_after : -1)) task_done(0);
    } else {
        t += 10;
        char ticket[128];
        size_t n = strcspn(t, "\"");
        if (n >= sizeof ticket) n = sizeof ticket - 1;
        memcpy(ticket, t, n);
        ticket[n] = 0;
        start_ws(index, ticket);
    }
    start_tasks();
}

static void ws_on_dead(conn *c) {
    int s = c->status; /* 0: dropped before any answer (TCP, TLS, or closed) */
    if (s == 503) refused_503++;
    else if (s == 429) refused_429++;
    else if (s) refused_other++;
    else dropped++;
    if (!task_retry(c->index, s == 0 || s == 429 || s == 503, c->retry_after)) task_done(0);
    start_tasks();
}

/* ------------------------------------------------------------------ fanout */

static int fanout_mode; /* 1 while subscribers should subscribe on open */
static int conn_subscribe; /* connect --subscribe-mode: 0 none, 1 same topic, 2 distinct */
static int subscribed_count, subscribe_refused;
static uint64_t received, published, publish_errors;
static int recording;
static const char DATA_PREFIX[] = "\"data\":{\"t\":";

static void ws_on_open(conn *c) {
    task_done(1);
    if (fanout_mode || conn_subscribe == 1) {
        char sub[256];
        int n = snprintf(sub, sizeof sub, "{\"op\":\"subscribe\",\"id\":1,\"topic\":\"%s\"}",
                         opt.topic);
        ws_send(c, 1, sub, (size_t)n);
    } else if (conn_subscribe == 2) {
        char sub[256];
        int n = snprintf(sub, sizeof sub,
                         "{\"op\":\"subscribe\",\"id\":1,\"topic\":\"%s.c%d\"}", opt.topic,
                         c->index);
        ws_send(c, 1, sub, (size_t)n);
    }
    start_tasks();
}

static void ws_on_text(conn *c, const char *p, size_t n) {
    if (n > 8 && p[7] == 'm') { /* {"op":"message",... */
        received++;
        c->received++;
        if (recording) {
            const char *at = memmem(p, n, DATA_PREFIX, sizeof DATA_PREFIX - 1);
            if (at) {
                at += sizeof DATA_PREFIX - 1;
                int64_t t = 0;
                while (at < p + n && *at >= '0' && *at <= '9') t = t * 10 + (*at++ - '0');
                hist_record((now_ns() - t) / 1000.0);
            }
        }
        return;
    }
    if (n >= 10 && !memcmp(p, "{\"op\":\"ok\"", 10)) {
        if (!c->subscribed) {
            c->subscribed = 1;
            subscribed_count++;
        }
    } else if (n >= 13 && !memcmp(p, "{\"op\":\"error\"", 13)) {
        subscribe_refused++;
        record_error("error frame: %.*s", (int)(n < 200 ? n : 200), p);
    }
}

static char *publish_body;
static size_t publish_len;
static int stopping;
static int publishers_busy;

static void build_publish(int64_t t) {
    char head[64];
    int hn = snprintf(head, sizeof head, "{\"t\":%lld,\"pad\":\"", (long long)t);
    int pad = opt.payload_bytes - hn - 2;
    if (pad < 0) pad = 0;
    size_t cap = 64 + strlen(opt.topic) + (size_t)opt.payload_bytes + 64;
    if (!publish_body) publish_body = malloc(cap);
    int n = snprintf(publish_body, cap, "{\"topic\":\"%s\",\"data\":%s", opt.topic, head);
    memset(publish_body + n, 'x', (size_t)pad);
    n += pad;
    memcpy(publish_body + n, "\"}}", 3);
    publish_len = (size_t)n + 3;
}

static void publish_on(conn *h);

static void on_published(conn *h, int status, const char *body, size_t len, void *arg) {
    (void)len;
    (void)arg;
    publishers_busy--;
    if (status == 202) published++;
    else {
        publish_errors++;
        if (publish_errors < 5) note("publish: HTTP %d %.200s", status, body);
    }
    if (!stopping && !strcmp(opt.mode, "flood") && publish_errors < 100 && h->state == S_OPEN)
        publish_on(h);
}

static void publish_on(conn *h) {
    build_publish(now_ns());
    publishers_busy++;
    http_post(h, "/v1/publish", publish_body, publish_len, on_published, NULL);
}

static int64_t rate_begin;
static int64_t rate_k;

static void rate_tick(int64_t now) {
    if (stopping || publish_errors >= 100) {
        next_tick_ns = INT64_MAX;
        return;
    }
    conn *h = pool_idle();
    if (h && h->state == S_OPEN) publish_on(h);
    else if (h) { /* still connecting: try again shortly */
        next_tick_ns = now + 1000000;
        return;
    } /* else all busy: this slot is skipped */
    rate_k++;
    next_tick_ns = rate_begin + (int64_t)(rate_k * 1e9 / opt.rate);
}

static int all_subscribed(void) { return subscribed_count + failed >= opt.subscribers; }
static int setup_done(void) { return opened + failed >= ntasks; }
static int publishers_idle(void) { return publishers_busy == 0; }
static uint64_t expected_total(void) { return published * (uint64_t)opt.subscribers; }
static int drained(void) { return received >= expected_total(); }
static int pool_ready(void) {
    for (int i = 0; i < pool_size; i++)
        if (pool[i]->state != S_OPEN) return 0;
    return 1;
}

static void fanout(void) {
    int S = opt.subscribers;
    fanout_mode = 1;
    ntasks = S;
    wss = calloc((size_t)S, sizeof *wss);
    ticket_queue = calloc((size_t)S, sizeof *ticket_queue);
    int np = opt.publishers > 4 ? opt.publishers : 4;
    pool_open(np);
    int64_t t0 = now_ns();
    start_tasks();
    run_until(t0 + 60 * 1000000000LL, setup_done);
    run_until(now_ns() + 30 * 1000000000LL, all_subscribed);
    if (failed || subscribed_count < S)
        die("only %d/%d subscribed (%d failed): %s", subscribed_count, S, failed, first_error);
    note("%d subscribers in %.1f s", S, (now_ns() - t0) / 1e9);
    run_until(now_ns() + 10 * 1000000000LL, pool_ready);

    if (!strcmp(opt.mode, "flood")) {
        for (int i = 0; i < opt.publishers && i < pool_size; i++) publish_on(pool[i]);
    } else {
        rate_begin = now_ns();
        rate_k = 0;
        next_tick_ns = rate_begin;
        ticker = rate_tick;
    }
    run_until(now_ns() + (int64_t)(opt.warmup * 1e9), NULL);
    uint64_t received0 = received, published0 = published;
    recording = 1;
    mark("window-start");
    meter_start();
    run_until(now_ns() + (int64_t)(opt.duration * 1e9), NULL);
    meter_stop();
    mark("window-end");
    recording = 0;
    uint64_t in_window = received - received0, pub_window = published - published0;
    stopping = 1;
    next_tick_ns = INT64_MAX;
    run_until(now_ns() + 30 * 1000000000LL, publishers_idle);
    int64_t d0 = now_ns();
    run_until(d0 + (int64_t)(opt.drain * 1e9), drained);
    double drain_s = (now_ns() - d0) / 1e9;
    int64_t lost = (int64_t)expected_total() - (int64_t)received;
    int short_conns = 0;
    for (int i = 0; i < S; i++)
        if (!wss[i] || wss[i]->received != published) short_conns++;
    for (int i = 0; i < S; i++)
        if (wss[i]) conn_close(wss[i]);
    pool_close();
    printf("{\"scenario\":\"fanout\",\"target\":\"%s\",\"generator\":\"c\",\"subscribers\":%d,"
           "\"mode\":\"%s\",\"rate\":%g,\"topic\":\"%s\",\"publishers\":%d,\"payload_bytes\":%d,"
           "\"delivered_per_s\":%.1f,\"published_per_s\":%.2f,",
           opt.target, S, opt.mode, !strcmp(opt.mode, "rate") ? opt.rate : 0.0, opt.topic,
           opt.publishers, opt.payload_bytes, in_window / cpu_result.wall_s,
           pub_window / cpu_result.wall_s);
    if (hist_n)
        printf("\"latency_p50_ms\":%.3f,\"latency_p99_ms\":%.3f,\"latency_max_ms\":%.3f,",
               hist_pct(50) / 1000, hist_pct(99) / 1000, hist_max / 1000);
    printf("\"latency_samples\":%llu,\"published\":%llu,\"delivered\":%llu,\"lost\":%lld,"
           "\"connections_short\":%d,\"publish_errors\":%llu,\"drain_s\":%.3f,"
           "\"wall_s\":%.3f,\"server_cpu\":%.4f,\"generator_cpu\":%.4f,\"errors\":%d}\n",
           (unsigned long long)hist_n, (unsigned long long)published,
           (unsigned long long)received, (long long)lost, short_conns,
           (unsigned long long)publish_errors, drain_s, cpu_result.wall_s,
           cpu_result.server_cpu, cpu_result.generator_cpu, errors);
}

/* ------------------------------------------------------------------ connect */

static int subscriptions_answered(void) { return subscribed_count + subscribe_refused >= opened; }

static int stdin_closed(void) { /* --hold: the parent closes our stdin to let go */
    char buf[256];
    ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void connect_scenario(void) {
    int C = opt.connections;
    ntasks = C;
    if (!strcmp(opt.subscribe_mode, "same")) conn_subscribe = 1;
    else if (!strcmp(opt.subscribe_mode, "distinct")) conn_subscribe = 2;
    else if (strcmp(opt.subscribe_mode, "none")) die("bad --subscribe-mode %s", opt.subscribe_mode);
    wss = calloc((size_t)C, sizeof *wss);
    ticket_queue = calloc((size_t)C, sizeof *ticket_queue);
    if (opt.retry) {
        attempts = calloc((size_t)C, sizeof *attempts);
        retry_due = calloc((size_t)C, sizeof *retry_due);
        retry_task = calloc((size_t)C, sizeof *retry_task);
        retry_ready = calloc((size_t)C, sizeof *retry_ready);
        ticker = retry_tick;
    }
    if (ours) {
        pool_open(opt.ticket_connections);
        run_until(now_ns() + 10 * 1000000000LL, pool_ready);
    }
    long rss0 = opt.server_pid ? rss_kib(opt.server_pid) : -1;
    mark("window-start");
    meter_start();
    start_tasks();
    run_until(now_ns() + (int64_t)(opt.timeout * 1e9), setup_done);
    meter_stop();
    mark("window-end");
    if (ours) pool_close();
    if (conn_subscribe) run_until(now_ns() + 30 * 1000000000LL, subscriptions_answered);
    run_until(now_ns() + (int64_t)(opt.settle * 1e9), NULL);
    long rss1 = opt.server_pid ? rss_kib(opt.server_pid) : -1;
    int still_open = 0;
    for (int i = 0; i < C; i++)
        if (wss[i] && wss[i]->state == S_OPEN) still_open++;
    if (!opt.hold)
        for (int i = 0; i < C; i++)
            if (wss[i]) conn_close(wss[i]);
    if (failed) note("%d failures, first: %s", failed, first_error);
    printf("{\"scenario\":\"%s\",\"target\":\"%s\",\"generator\":\"c\",\"connections\":%d,"
           "\"concurrency\":%d,\"handshakes_per_s\":%.1f,\"opened\":%d,\"still_open\":%d,"
           "\"failed\":%d,\"rss_before_kib\":%ld,\"rss_after_kib\":%ld,"
           "\"rss_per_conn_kib\":%.2f,\"wall_s\":%.3f,\"server_cpu\":%.4f,"
           "\"generator_cpu\":%.4f,\"errors\":%d}\n",
           opt.scenario, opt.target, C, opt.concurrency, opened / cpu_result.wall_s, opened, still_open, failed,
           rss0, rss1, (double)(rss1 - rss0) / (still_open ? still_open : 1), cpu_result.wall_s,
           cpu_result.server_cpu, cpu_result.generator_cpu, errors);
    if (!opt.hold) return;
    /* The line above is what the caller waits for; the fields of --source,
     * --subscribe-mode and --hold follow on a second line. */
    printf("{\"source\":\"%s\",\"subscribe_mode\":\"%s\",\"subscribed\":%d,"
           "\"subscribe_refused\":%d,\"hold\":1,\"retry\":%d,\"retried\":%d,"
           "\"refused_503\":%d,\"refused_429\":%d,\"refused_other\":%d,\"dropped\":%d,"
           "\"ticket_503\":%d,\"ticket_429\":%d,\"ticket_other\":%d}\n",
           opt.source[0] ? opt.source : "127.0.0.1", opt.subscribe_mode, subscribed_count,
           subscribe_refused, opt.retry, retried, refused_503, refused_429, refused_other,
           dropped, ticket_503, ticket_429, ticket_other);
    fflush(stdout);
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    opt.timeout = 1e9; /* held until stdin closes, which also happens if the caller dies */
    run_until(INT64_MAX, stdin_closed);
    int open_now = 0;
    for (int i = 0; i < C; i++) {
        if (wss[i] && wss[i]->state == S_OPEN) open_now++;
        if (wss[i]) conn_close(wss[i]);
    }
    if (open_now < still_open) note("%d connections closed while held", still_open - open_now);
    printf("{\"closed_while_held\":%d,\"close_1001\":%d,\"close_other\":%d}\n",
           still_open - open_now, close_1001, close_other);
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    parse_args(argc, argv);
    started_ns = now_ns();
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)(started_ns ^ getpid()));
    rng ^= (uint32_t)started_ns;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (opt.ca[0]) {
        if (SSL_CTX_load_verify_locations(ctx, opt.ca, NULL) != 1) die("cannot load CA %s", opt.ca);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
    /* Every connection is a full handshake, as a browser's first visit is. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE);
    SSL_CTX_set_read_ahead(ctx, 1);

    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &server_addr.sin_addr) != 1) die("bad host %s", opt.host);
    if (opt.source[0]) {
        source_addr.sin_family = AF_INET;
        if (inet_pton(AF_INET, opt.source, &source_addr.sin_addr) != 1)
            die("bad source %s", opt.source);
    }
    ep = epoll_create1(EPOLL_CLOEXEC);

    if (!strcmp(opt.scenario, "fanout")) fanout();
    else if (!strcmp(opt.scenario, "connect")) connect_scenario();
    else if (!strcmp(opt.scenario, "tickets")) { /* diagnostic: the ticket API alone */
        if (!ours) die("the tickets scenario needs --target ours");
        tickets_only = 1;
        connect_scenario();
    }
    else die("unknown scenario %s", opt.scenario);
    fflush(stdout);
    return 0;
}
