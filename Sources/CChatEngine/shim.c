#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "CChatEngine.h"

int chatengine_accept(int listen_fd) {
    return accept4(listen_fd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

struct waker { int watch_fd; int signal_fd; };

static void *waker_main(void *arg) {
    struct waker w = *(struct waker *)arg;
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
    static struct waker w;
    w.watch_fd = watch_fd;
    w.signal_fd = signal_fd;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int r = pthread_create(&thread, &attr, waker_main, &w);
    pthread_attr_destroy(&attr);
    return r;
}
