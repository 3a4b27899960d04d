#ifndef CCHATENGINE_H
#define CCHATENGINE_H

// What ChatEngine needs that Swift's Glibc module does not show: epoll, and accept4 (a GNU
// extension: declaring _GNU_SOURCE here would clash with the Glibc module's definitions).
#include <sys/epoll.h>

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC, no address.
int chatengine_accept(int listen_fd);

#endif
