#ifndef CCHATENGINE_H
#define CCHATENGINE_H

// What ChatEngine needs that Swift's Glibc module does not show: epoll, and accept4 (a GNU
// extension: declaring _GNU_SOURCE here would clash with the Glibc module's definitions).
#include <sys/epoll.h>

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC, no address.
int chatengine_accept(int listen_fd);

/// Starts a thread that waits on `watch_fd` (an epoll descriptor holding another loop's
/// epoll descriptor, EPOLLONESHOT) and writes a byte to `signal_fd` each time it reports,
/// so that a loop which cannot watch that descriptor itself learns when to turn it. One
/// per process. Returns pthread_create's result.
int chatengine_start_waker(int watch_fd, int signal_fd);

#endif
