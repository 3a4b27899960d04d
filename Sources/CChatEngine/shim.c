#define _GNU_SOURCE
#include <sys/socket.h>
#include "CChatEngine.h"

int chatengine_accept(int listen_fd) {
    return accept4(listen_fd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
}
