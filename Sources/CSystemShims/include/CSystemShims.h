#ifndef CSYSTEMSHIMS_H
#define CSYSTEMSHIMS_H

// C entry points Swift cannot call directly (variadic, or macros).

/// Asks the kernel to send `signal` to this process when its parent exits.
/// Returns 0, or -1 with errno set.
int chatgw_set_parent_death_signal(int signal);

#endif
