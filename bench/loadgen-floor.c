// loadgen-floor: the least a load generator can do per handshake and per message
// received, against chatengine-probe (nchan's /sub and /pub): raw epoll, edge-triggered,
// nothing allocated or parsed beyond the frame lengths. CPU from getrusage over the
// measured phase only (the handshakes; the publishing window and 1 s of tail). BENCHMARKS.md,
// "The load generator's floor", has the figures and how they were taken.
//
//   gcc -O2 -o /tmp/loadgen-floor bench/loadgen-floor.c
//   chatengine-probe --port P --workers 2 &
//   /tmp/loadgen-floor connect P 20000 256 3 2          # N, in flight, source addresses, processes
//   /tmp/loadgen-floor fanout P 18000 100 100 500 10    # members, rooms, publishers, msg/s, seconds
//   /tmp/loadgen-floor fanout P 18000 100 100 500 10 1000   # ... napping 1000 us after each wake-up
//
// connect also takes `nodelay` (TCP_NODELAY on every socket) and `sendnow` (the request
// sent right after connect() instead of on EPOLLOUT).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
static double ru_us(struct rusage *a, struct rusage *b, int sys) {
    struct timeval x = sys ? a->ru_stime : a->ru_utime, y = sys ? b->ru_stime : b->ru_utime;
    return (y.tv_sec - x.tv_sec) * 1e6 + (y.tv_usec - x.tv_usec);
}

static int port;
static int nodelay, sendnow;
static char req[512];
static int reqlen;

enum { CONNECTING = 1, SENT = 2, OPEN = 3 };
static unsigned char *state;

/// Per descriptor: the room it subscribes or publishes to, and 1 << 30 for a publisher.
static int *room_of;
static int built = -1;

/// The upgrade request for `fd` in req/reqlen (formatted again only when it differs).
static void make_request(int fd) {
    if (room_of[fd] == built) return;
    built = room_of[fd];
    reqlen = snprintf(req, sizeof req,
        "GET %s?room=floor-%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        built >> 30 ? "/pub" : "/sub", built & 0xffff, port);
}

static int open_one(int epfd, int idx, int nsources, int tag) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("socket"); exit(1); }
    int one = 1;
    if (nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, 4);
    if (nsources > 0) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, 4);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002 + (idx % nsources));
        if (bind(fd, (void *)&src, sizeof src) < 0) { perror("bind"); exit(1); }
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    dst.sin_addr.s_addr = htonl(0x7f000001);
    int r = connect(fd, (void *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) { perror("connect"); exit(1); }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
    state[fd] = CONNECTING;
    room_of[fd] = tag;
    if (sendnow) {
        make_request(fd);
        if (send(fd, req, reqlen, MSG_NOSIGNAL) == reqlen) state[fd] = SENT;
    }
    return fd;
}

/// Opens connections first .. first+n-1 with `conc` in flight and waits for every 101.
/// Index i < members subscribes to room i % rooms, the others publish to (i - members) % rooms.
static void handshake_all(int epfd, int n, int conc, int nsources, int first, int members, int rooms, int *fds_out) {
    struct epoll_event evs[512];
    char buf[4096];
    int launched = 0, done = 0, inflight = 0;
    while (done < n) {
        while (inflight < conc && launched < n) {
            int idx = first + launched;
            int tag = idx < members ? idx % rooms : ((idx - members) % rooms) | 1 << 30;
            fds_out[launched] = open_one(epfd, idx, nsources, tag);
            launched++;
            inflight++;
        }
        int k = epoll_wait(epfd, evs, 512, 1000);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            uint32_t f = evs[i].events;
            if (f & (EPOLLERR | EPOLLHUP)) { fprintf(stderr, "fd %d error\n", fd); exit(1); }
            if (state[fd] == CONNECTING && (f & EPOLLOUT)) {
                make_request(fd);
                if (send(fd, req, reqlen, MSG_NOSIGNAL) == reqlen) state[fd] = SENT;
            }
            if (state[fd] == SENT && (f & EPOLLIN)) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r > 12 && memcmp(buf, "HTTP/1.1 101", 12) == 0) {
                    state[fd] = OPEN;
                    done++;
                    inflight--;
                } else if (!(r < 0 && errno == EAGAIN)) { fprintf(stderr, "bad response %zd\n", r); exit(1); }
            }
        }
    }
}

static void do_connect(int argc, char **argv) {
    int n = atoi(argv[3]), conc = atoi(argv[4]), nsources = atoi(argv[5]), procs = atoi(argv[6]);
    for (int i = 7; i < argc; i++) {
        if (!strcmp(argv[i], "nodelay")) nodelay = 1;
        if (!strcmp(argv[i], "sendnow")) sendnow = 1;
    }
    int pipes[64][2];
    for (int p = 0; p < procs; p++) {
        pipe(pipes[p]);
        if (fork() == 0) {
            int mine = n / procs;
            state = calloc(1 << 20, 1);
            room_of = calloc(1 << 20, sizeof(int));
            int *fds = calloc(mine, sizeof(int));
            struct rusage a, b;
            getrusage(RUSAGE_SELF, &a);
            uint64_t t0 = now_ns();
            handshake_all(epoll_create1(EPOLL_CLOEXEC), mine, conc / procs, nsources, p * mine, n, 1, fds);
            uint64_t t1 = now_ns();
            getrusage(RUSAGE_SELF, &b);
            double res[3] = {ru_us(&a, &b, 0), ru_us(&a, &b, 1), (t1 - t0) / 1e9};
            write(pipes[p][1], res, sizeof res);
            struct linger l = {1, 0};
            for (int i = 0; i < mine; i++) { setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &l, sizeof l); close(fds[i]); }
            _exit(0);
        }
    }
    double u = 0, s = 0, secs = 0;
    for (int p = 0; p < procs; p++) {
        double res[3];
        read(pipes[p][0], res, sizeof res);
        u += res[0]; s += res[1]; if (res[2] > secs) secs = res[2];
    }
    while (wait(NULL) > 0) {}
    printf("{\"handshakes\": %d, \"seconds\": %.3f, \"per_s\": %.0f, \"user_us\": %.2f, \"sys_us\": %.2f, \"cpu_us\": %.2f}\n",
           n, secs, n / secs, u / n, s / n, (u + s) / n);
}

// ---- fanout ----
static uint64_t deliveries, waits, recvs;

static void do_fanout(int argc, char **argv) {
    int members = atoi(argv[3]), rooms = atoi(argv[4]), pubs = atoi(argv[5]);
    double rate = atof(argv[6]), seconds = atof(argv[7]);
    int sleepus = argc > 8 ? atoi(argv[8]) : 0;
    state = calloc(1 << 20, 1);
    room_of = calloc(1 << 20, sizeof(int));
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[512];
    static char buf[65536];
    int total = members + pubs;
    int *fds = calloc(total, sizeof(int));
    nodelay = 1;
    // members first, then publishers, 256 in flight
    handshake_all(epfd, total, 256, 0, 0, members, rooms, fds);
    int *pubfd = fds + members;
    fprintf(stderr, "floor: %d open\n", total);
    sleep(1);
    // publish: each publisher rate/pubs msgs/s, 2 ms ticks; members read frames.
    struct rusage a, b;
    getrusage(RUSAGE_SELF, &a);
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), last_rx = start;
    uint64_t sent = 0, next_tick = start;
    double per_pub = rate / pubs;
    uint64_t *pub_sent = calloc(pubs, sizeof(uint64_t));
    unsigned char frame[128];
    for (;;) {
        uint64_t t = now_ns();
        if (t < end && t >= next_tick) {
            double el = (t - start) / 1e9;
            for (int p = 0; p < pubs; p++) {
                uint64_t due = (uint64_t)(el * per_pub + (double)p / pubs);
                while (pub_sent[p] < due) {
                    char text[96];
                    int n = snprintf(text, sizeof text, "t=%llu;p=%d;n=%llu", (unsigned long long)now_ns(), p, (unsigned long long)pub_sent[p] + 1);
                    while (n < 64) text[n++] = 'x';
                    frame[0] = 0x81; frame[1] = 0x80 | n; frame[2] = frame[3] = frame[4] = frame[5] = 0;
                    memcpy(frame + 6, text, n);
                    send(pubfd[p], frame, 6 + n, MSG_NOSIGNAL);
                    pub_sent[p]++;
                    sent++;
                }
            }
            next_tick = t + 2000000;
        }
        if (t >= end && t - last_rx > 1000000000ull) break;
        int timeout = t < end ? (int)((next_tick > t ? next_tick - t + 999999 : 0) / 1000000) : 100;
        int k = epoll_wait(epfd, evs, 512, timeout);
        waits++;
        if (k > 0) last_rx = now_ns();
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (!(evs[i].events & EPOLLIN)) continue;
            for (;;) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                recvs++;
                if (r <= 0) break;
                // count frames (server frames, unmasked, < 126 bytes)
                ssize_t at = 0;
                while (at + 2 <= r) { int len = buf[at + 1] & 0x7f; at += 2 + len; deliveries++; }
                if (r < (ssize_t)sizeof buf) break;
            }
        }
        if (sleepus && k > 0) usleep(sleepus);
    }
    getrusage(RUSAGE_SELF, &b);
    double u = ru_us(&a, &b, 0), s = ru_us(&a, &b, 1);
    printf("{\"epoll_waits_per_delivery\": %.3f, \"recvs_per_delivery\": %.3f, ", (double)waits / deliveries, (double)recvs / deliveries);
    printf("\"sent\": %llu, \"deliveries\": %llu, \"user_us\": %.3f, \"sys_us\": %.3f, \"cpu_us_per_message\": %.3f}\n",
           (unsigned long long)sent, (unsigned long long)deliveries, u / (deliveries + sent), s / (deliveries + sent),
           (u + s) / (deliveries + sent));
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage\n"); return 2; }
    port = atoi(argv[2]);
    if (!strcmp(argv[1], "connect")) do_connect(argc, argv);
    else do_fanout(argc, argv);
    return 0;
}
