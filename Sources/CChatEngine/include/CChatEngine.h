#ifndef CCHATENGINE_H
#define CCHATENGINE_H

// What ChatEngine needs that Swift's Glibc module does not show: epoll, and accept4 (a GNU
// extension: declaring _GNU_SOURCE here would clash with the Glibc module's definitions).
#include <stdint.h>
#include <sys/epoll.h>

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC, no address.
int chatengine_accept(int listen_fd);

// read, send (MSG_NOSIGNAL), close and epoll_wait as plain syscalls: -1 and errno on
// failure, as libc's. libc's own are cancellation points, which in a process with more
// than one thread (a worker has NIO's) wrap every call in two atomic updates of the
// thread's cancellation state; the loop never blocks in them and no thread is cancelled.
long chatengine_read(int fd, void *buffer, unsigned long count);
long chatengine_send(int fd, const void *buffer, unsigned long count);
int chatengine_close(int fd);
int chatengine_epoll_wait(int epfd, struct epoll_event *events, int max_events, int timeout);

/// Grows this process's descriptor table at once to hold descriptors up to `count` (at most
/// the soft RLIMIT_NOFILE). Linux doubles the table as descriptors are opened, and in a
/// process with more than one thread each doubling waits in accept() or socket() for an RCU
/// grace period (5-25 ms on the 2-core machine) with nothing else to do: a storm of
/// connections into a fresh worker stalled about six times. Grown once at start, it waits
/// at most once, before any connection. Returns 0 or an errno.
int chatengine_reserve_descriptors(int count);

/// 1 where the CPU has the SHA extensions (x86-64 SHA-NI, with SSSE3 and SSE4.1), else 0.
int chatengine_sha1_hardware(void);

/// Compresses `count` 64-byte blocks into the SHA-1 `state` with the SHA extensions and
/// returns 1; returns 0 and does nothing where the CPU lacks them.
int chatengine_sha1_blocks(uint32_t state[5], const void *blocks, unsigned long count);

/// Starts a thread that waits on `watch_fd` (an epoll descriptor holding another loop's
/// epoll descriptor, EPOLLONESHOT) and writes a byte to `signal_fd` each time it reports,
/// so that a loop which cannot watch that descriptor itself learns when to turn it.
/// Returns pthread_create's result.
int chatengine_start_waker(int watch_fd, int signal_fd);

struct chatengine_ring;

/// An io_uring that watches `watched_fd` (another loop's epoll descriptor) for the thread
/// that arms it: once armed, the descriptor's readiness completes a one-shot poll, which
/// signals the eventfd put in `event_fd_out` (non-blocking; for that thread's own loop to
/// read). The completion runs as the arming thread's task work, waking it if it sleeps: no
/// thread of ours in between. NULL, with -errno in `event_fd_out`, where io_uring is
/// missing or forbidden (as under some seccomp profiles).
struct chatengine_ring *chatengine_ring_start(int watched_fd, int *event_fd_out);

/// Arms the one-shot poll (after consuming what completed); returns 0 or the errno.
int chatengine_ring_arm(struct chatengine_ring *ring);

#endif
