#ifndef CSYSTEMSHIMS_H
#define CSYSTEMSHIMS_H

// C entry points Swift cannot call directly (variadic, or macros).

/// Asks the kernel to send `signal` to this process when its parent exits.
/// Returns 0, or -1 with errno set.
int chatgw_set_parent_death_signal(int signal);

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC (a GNU extension Swift cannot see).
int chatgw_accept_nonblocking(int listen_fd);

/// The uid of the process at the other end of a Unix socket (SO_PEERCRED), or -1.
long chatgw_peer_uid(int fd);

#endif
