/*
 * wsbench: a small epoll WebSocket client for benches/proxy.sh, cheap enough (a few µs of
 * CPU per session) that the proxy in front of the servers, not the client, is what is
 * measured.
 *
 *   wsbench sessions HOST PORT PATH CONCURRENCY SECONDS
 *       CONCURRENCY sessions at a time, each: connect, upgrade, read the server's first
 *       message, send a close frame, read to the end; then the next. Prints
 *       "sessions N per_second R first_message_p50_us P p99_us Q errors E".
 *   wsbench hold HOST PORT PATH COUNT
 *       Opens COUNT sessions (upgrade and first message), prints "held N", keeps them
 *       until stdin closes or a line arrives, closes them (close frame, then the socket)
 *       and prints "closed".
 *
 * Loopback only: HOST must be an IPv4 address. Every loop is bounded (by SECONDS, or by
 * COUNT and a 60 s deadline).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, HEAD, FIRST, CLOSING, IDLE };

struct conn {
    int fd;
    enum state st;
    double started;
    size_t len;
    char buf[1024];
};

static struct sockaddr_in addr;
static char request[512];
static size_t request_len;
static int epfd;
static double *lat;
static size_t nlat, caplat;
static long errors, completed;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int start(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->st = CONNECTING;
    c->len = 0;
    c->started = now();
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static void finish(struct conn *c, int failed) {
    if (failed)
        errors++;
    else
        completed++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

/* A whole frame at the start of buf: its total length, or 0 when more is needed. */
static size_t frame_len(const unsigned char *b, size_t n) {
    if (n < 2) return 0;
    size_t len = b[1] & 0x7f, head = 2;
    if (len == 126) {
        if (n < 4) return 0;
        len = (size_t)b[2] << 8 | b[3];
        head = 4;
    } else if (len == 127) {
        return 0; /* first messages here are small */
    }
    if (b[1] & 0x80) head += 4;
    return n >= head + len ? head + len : 0;
}

static const unsigned char CLOSE[] = {0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2};

/* Advances a connection on readiness; returns 1 when its session is done. */
static int step(struct conn *c, int hold) {
    if (c->st == CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { finish(c, 1); return 1; }
        if (write(c->fd, request, request_len) != (ssize_t)request_len) { finish(c, 1); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->st = HEAD;
        return 0;
    }
    for (;;) {
        if (c->len == sizeof c->buf) { finish(c, 1); return 1; }
        ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (n <= 0) {
            /* The end: expected only once our close went out. */
            finish(c, c->st != CLOSING);
            return 1;
        }
        c->len += n;
        if (c->st == CLOSING) { c->len = 0; continue; }
        if (c->st == HEAD) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) continue;
            if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) { finish(c, 1); return 1; }
            size_t used = end + 4 - c->buf;
            memmove(c->buf, c->buf + used, c->len - used);
            c->len -= used;
            c->st = FIRST;
        }
        if (c->st == FIRST) {
            size_t f = frame_len((unsigned char *)c->buf, c->len);
            if (!f) continue;
            if (nlat == caplat) {
                caplat = caplat ? caplat * 2 : 1 << 16;
                lat = realloc(lat, caplat * sizeof *lat);
            }
            lat[nlat++] = now() - c->started;
            c->len = 0;
            if (hold) {
                /* Held as it is: not read again until the end. */
                epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                c->st = IDLE;
                return 1;
            }
            if (write(c->fd, CLOSE, sizeof CLOSE) != sizeof CLOSE) { finish(c, 1); return 1; }
            c->st = CLOSING;
        }
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 6) {
        fprintf(stderr, "usage: wsbench sessions HOST PORT PATH CONCURRENCY SECONDS\n"
                        "       wsbench hold HOST PORT PATH COUNT\n");
        return 2;
    }
    int hold = strcmp(argv[1], "hold") == 0;
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1 || (ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "wsbench: HOST must be a 127.0.0.0/8 address\n");
        return 2;
    }
    request_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                           argv[4], argv[2], argv[3]);
    long n = atol(argv[5]);
    double seconds = hold ? 60 : atof(argv[6]);
    struct conn *conns = calloc(n, sizeof *conns);
    epfd = epoll_create1(0);
    struct epoll_event evs[256];
    double t0 = now(), deadline = t0 + seconds;
    long held = 0;
    for (long i = 0; i < n; i++)
        if (start(&conns[i]) < 0) errors++;
    while (now() < deadline && (!hold || held + errors < n)) {
        int k = epoll_wait(epfd, evs, 256, 100);
        for (int i = 0; i < k; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!step(c, hold)) continue;
            if (hold) {
                if (c->st == IDLE) held++;
                continue;
            }
            if (now() < deadline && start(c) < 0) errors++;
        }
    }
    double elapsed = now() - t0;
    qsort(lat, nlat, sizeof *lat, cmp);
    double p50 = nlat ? lat[nlat / 2] * 1e6 : 0, p99 = nlat ? lat[nlat * 99 / 100] * 1e6 : 0;
    if (hold) {
        printf("held %ld first_message_p50_us %.0f p99_us %.0f errors %ld\n", held, p50, p99, errors);
        fflush(stdout);
        char line[16];
        if (fgets(line, sizeof line, stdin)) {}
        for (long i = 0; i < n; i++) {
            if (conns[i].fd < 0 || conns[i].st != IDLE) continue;
            if (write(conns[i].fd, CLOSE, sizeof CLOSE) < 0) {}
            close(conns[i].fd);
        }
        printf("closed\n");
        return 0;
    }
    printf("sessions %ld per_second %.0f first_message_p50_us %.0f p99_us %.0f errors %ld\n",
           completed, completed / elapsed, p50, p99, errors);
    return 0;
}
