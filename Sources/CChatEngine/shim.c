#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "CChatEngine.h"
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

int chatengine_accept(int listen_fd) {
    return (int)syscall(SYS_accept4, listen_fd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

long chatengine_read(int fd, void *buffer, unsigned long count) {
    return syscall(SYS_read, fd, buffer, count);
}

long chatengine_send(int fd, const void *buffer, unsigned long count) {
    return syscall(SYS_sendto, fd, buffer, count, MSG_NOSIGNAL, 0, 0);
}

int chatengine_close(int fd) {
    return (int)syscall(SYS_close, fd);
}

int chatengine_epoll_wait(int epfd, struct epoll_event *events, int max_events, int timeout) {
    return (int)syscall(SYS_epoll_wait, epfd, events, max_events, timeout);
}

int chatengine_reserve_descriptors(int count) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return errno;
    if ((rlim_t)count > limit.rlim_cur) count = (int)limit.rlim_cur;
    if (count <= 64) return 0;  // a process's first table already holds 64
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null_fd < 0) return errno;
    // The lowest free number from count - 1 up: the table grows to hold it either way.
    int high = fcntl(null_fd, F_DUPFD_CLOEXEC, count - 1);
    int error = high < 0 ? errno : 0;
    if (high >= 0) close(high);
    close(null_fd);
    return error;
}

struct waker { int watch_fd; int signal_fd; };

static void *waker_main(void *arg) {
    struct waker w = *(struct waker *)arg;
    free(arg);
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, 0);  // signals are the owning thread's business
    struct epoll_event ev;
    char one = 1;
    for (;;) {
        int n = epoll_wait(w.watch_fd, &ev, 1, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return 0;
        if (n == 0) continue;
        while (write(w.signal_fd, &one, 1) < 0 && errno == EINTR) {}
    }
}

int chatengine_start_waker(int watch_fd, int signal_fd) {
    struct waker *w = malloc(sizeof *w);
    if (!w) return ENOMEM;
    w->watch_fd = watch_fd;
    w->signal_fd = signal_fd;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int r = pthread_create(&thread, &attr, waker_main, w);
    pthread_attr_destroy(&attr);
    if (r != 0) free(w);
    return r;
}

struct chatengine_ring {
    int fd, watched_fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
};

static int ring_setup(struct chatengine_ring *ring, int watched_fd, int event_fd) {
    struct io_uring_params p = {0};
    // Cooperative task running: a completion wakes the thread if it sleeps and never
    // interrupts it with an IPI while it runs.
    p.flags = IORING_SETUP_COOP_TASKRUN;
    int fd = (int)syscall(__NR_io_uring_setup, 8, &p);
    if (fd < 0) return errno;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) { close(fd); return ENOSYS; }
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t size = sq_size > cq_size ? sq_size : cq_size;
    char *rings = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (rings == MAP_FAILED) { int e = errno; close(fd); return e; }
    void *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) { int e = errno; munmap(rings, size); close(fd); return e; }
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &event_fd, 1) < 0) {
        int e = errno;
        munmap(sqes, p.sq_entries * sizeof(struct io_uring_sqe));
        munmap(rings, size);
        close(fd);
        return e;
    }
    ring->fd = fd;
    ring->watched_fd = watched_fd;
    ring->sq_tail = (unsigned *)(rings + p.sq_off.tail);
    ring->sq_mask = (unsigned *)(rings + p.sq_off.ring_mask);
    ring->sq_array = (unsigned *)(rings + p.sq_off.array);
    ring->cq_head = (unsigned *)(rings + p.cq_off.head);
    ring->cq_tail = (unsigned *)(rings + p.cq_off.tail);
    ring->sqes = sqes;
    return 0;
}

struct chatengine_ring *chatengine_ring_start(int watched_fd, int *event_fd_out) {
    struct chatengine_ring *ring = calloc(1, sizeof *ring);
    if (!ring) { *event_fd_out = -ENOMEM; return 0; }
    int event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int e = event_fd < 0 ? errno : ring_setup(ring, watched_fd, event_fd);
    if (e != 0) {
        if (event_fd >= 0) close(event_fd);
        free(ring);
        *event_fd_out = -e;
        return 0;
    }
    *event_fd_out = event_fd;
    return ring;
}

int chatengine_ring_arm(struct chatengine_ring *ring) {
    // What completed since the last arm was only a signal (the eventfd carried it): drop it.
    __atomic_store_n(ring->cq_head, __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
    unsigned tail = *ring->sq_tail;
    unsigned index = tail & *ring->sq_mask;
    struct io_uring_sqe *sqe = &ring->sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = ring->watched_fd;
    sqe->poll32_events = POLLIN;
    ring->sq_array[index] = index;
    __atomic_store_n(ring->sq_tail, tail + 1, __ATOMIC_RELEASE);
    for (;;) {
        long r = syscall(__NR_io_uring_enter, ring->fd, 1, 0, 0, 0, 0);
        if (r >= 0) return 0;
        if (errno != EINTR) return errno;
    }
}

#if defined(__x86_64__)
// SHA-1 with the x86 SHA extensions (SHA-NI): 4 rounds an instruction. The schedule and
// the rounds follow Intel's "New Instructions Supporting the Secure Hash Algorithm on Intel
// Architecture Processors" (Gulley et al., 2013), written out for the 20 groups of 4 rounds
// (sha1rnds4 takes its round function as an immediate, so a loop cannot pass it).
// The group's 4 message words, big-endian words in reverse lane order.
#define SHA1_LOAD(W, OFFSET) W = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + (OFFSET))), mask)
// W0 (the words 16 rounds back) becomes the next group's: msg2(msg1(W0, W1) ^ W2, W3).
#define SHA1_SCHEDULE(W0, W1, W2, W3) W0 = _mm_sha1msg2_epu32(_mm_xor_si128(_mm_sha1msg1_epu32(W0, W1), W2), W3)
// 4 rounds with round function F: E_NOW holds the A saved before the previous group (its
// rotation is this group's e), E_NEXT saves this group's A for the next.
#define SHA1_ROUNDS(E_NOW, E_NEXT, W, F) \
    do { E_NOW = _mm_sha1nexte_epu32(E_NOW, W); E_NEXT = abcd; abcd = _mm_sha1rnds4_epu32(abcd, E_NOW, F); } while (0)

__attribute__((target("sha,ssse3,sse4.1")))
static void sha1_blocks_shani(uint32_t state[5], const unsigned char *data, unsigned long count) {
    const __m128i mask = _mm_set_epi64x(0x0001020304050607ULL, 0x08090a0b0c0d0e0fULL);
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)state), 0x1B);
    __m128i e0 = _mm_set_epi32((int)state[4], 0, 0, 0);
    __m128i e1, w0, w1, w2, w3;
    for (; count > 0; count--, data += 64) {
        const __m128i abcd_save = abcd, e0_save = e0;
        SHA1_LOAD(w0, 0);  // rounds 0-3: e0 holds e itself, nothing to rotate in
        e0 = _mm_add_epi32(e0, w0);
        e1 = abcd;
        abcd = _mm_sha1rnds4_epu32(abcd, e0, 0);
        SHA1_LOAD(w1, 16);
        SHA1_ROUNDS(e1, e0, w1, 0);  // rounds 4-7
        SHA1_LOAD(w2, 32);
        SHA1_ROUNDS(e0, e1, w2, 0);  // rounds 8-11
        SHA1_LOAD(w3, 48);
        SHA1_ROUNDS(e1, e0, w3, 0);  // rounds 12-15
        SHA1_SCHEDULE(w0, w1, w2, w3);
        SHA1_ROUNDS(e0, e1, w0, 0);  // rounds 16-19
        SHA1_SCHEDULE(w1, w2, w3, w0);
        SHA1_ROUNDS(e1, e0, w1, 1);  // rounds 20-23
        SHA1_SCHEDULE(w2, w3, w0, w1);
        SHA1_ROUNDS(e0, e1, w2, 1);  // rounds 24-27
        SHA1_SCHEDULE(w3, w0, w1, w2);
        SHA1_ROUNDS(e1, e0, w3, 1);  // rounds 28-31
        SHA1_SCHEDULE(w0, w1, w2, w3);
        SHA1_ROUNDS(e0, e1, w0, 1);  // rounds 32-35
        SHA1_SCHEDULE(w1, w2, w3, w0);
        SHA1_ROUNDS(e1, e0, w1, 1);  // rounds 36-39
        SHA1_SCHEDULE(w2, w3, w0, w1);
        SHA1_ROUNDS(e0, e1, w2, 2);  // rounds 40-43
        SHA1_SCHEDULE(w3, w0, w1, w2);
        SHA1_ROUNDS(e1, e0, w3, 2);  // rounds 44-47
        SHA1_SCHEDULE(w0, w1, w2, w3);
        SHA1_ROUNDS(e0, e1, w0, 2);  // rounds 48-51
        SHA1_SCHEDULE(w1, w2, w3, w0);
        SHA1_ROUNDS(e1, e0, w1, 2);  // rounds 52-55
        SHA1_SCHEDULE(w2, w3, w0, w1);
        SHA1_ROUNDS(e0, e1, w2, 2);  // rounds 56-59
        SHA1_SCHEDULE(w3, w0, w1, w2);
        SHA1_ROUNDS(e1, e0, w3, 3);  // rounds 60-63
        SHA1_SCHEDULE(w0, w1, w2, w3);
        SHA1_ROUNDS(e0, e1, w0, 3);  // rounds 64-67
        SHA1_SCHEDULE(w1, w2, w3, w0);
        SHA1_ROUNDS(e1, e0, w1, 3);  // rounds 68-71
        SHA1_SCHEDULE(w2, w3, w0, w1);
        SHA1_ROUNDS(e0, e1, w2, 3);  // rounds 72-75
        SHA1_SCHEDULE(w3, w0, w1, w2);
        SHA1_ROUNDS(e1, e0, w3, 3);  // rounds 76-79
        e0 = _mm_sha1nexte_epu32(e0, e0_save);
        abcd = _mm_add_epi32(abcd, abcd_save);
    }
    _mm_storeu_si128((__m128i *)state, _mm_shuffle_epi32(abcd, 0x1B));
    state[4] = (uint32_t)_mm_extract_epi32(e0, 3);
}
#undef SHA1_LOAD
#undef SHA1_SCHEDULE
#undef SHA1_ROUNDS

static int sha1_shani_present(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int ssse3 = (c >> 9) & 1, sse41 = (c >> 19) & 1;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return ssse3 && sse41 && ((b >> 29) & 1);
}
#endif

int chatengine_sha1_hardware(void) {
#if defined(__x86_64__)
    // Asked once; a race writes the same answer twice.
    static int present = -1;
    if (present < 0) present = sha1_shani_present();
    return present;
#else
    return 0;
#endif
}

int chatengine_sha1_blocks(uint32_t state[5], const void *blocks, unsigned long count) {
#if defined(__x86_64__)
    if (!chatengine_sha1_hardware()) return 0;
    sha1_blocks_shani(state, blocks, count);
    return 1;
#else
    (void)state; (void)blocks; (void)count;
    return 0;
#endif
}
