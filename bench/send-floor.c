// send-floor: the least a server can spend per delivery on loopback, measured without a
// server: one process sends 100 bytes to each of N loopback TCP connections in turn, round
// after round, with a pause between rounds, and a reader in another process (epoll,
// edge-triggered) takes them. CPU of the sender alone, from getrusage over the measured
// rounds, per send. On loopback the reader's TCP input and wake-up run inside the sender's
// send(), as they do inside a server's, so this is the kernel's share of a delivery with no
// server code at all. BENCHMARKS.md ("The kernel floor of a delivery") has the figures.
//
//   gcc -O2 -o /tmp/send-floor bench/send-floor.c
//   /tmp/send-floor send 9000 60 500000          # N connections, rounds, pause in us (2 msg/s)
//   /tmp/send-floor uring 9000 60 500000 1024    # the same through io_uring, 1,024 sends an enter
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <signal.h>

static int N = 9000;
static double cpu_us(void){struct rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_utime.tv_sec*1e6+r.ru_utime.tv_usec+r.ru_stime.tv_sec*1e6+r.ru_stime.tv_usec;}
static double sys_us(void){struct rusage r;getrusage(RUSAGE_SELF,&r);return r.ru_stime.tv_sec*1e6+r.ru_stime.tv_usec;}

struct ring { int fd; unsigned *sq_head,*sq_tail,*sq_mask,*sq_array,*cq_head,*cq_tail,*cq_mask; struct io_uring_sqe *sqes; struct io_uring_cqe *cqes; unsigned entries; };
static int ring_init(struct ring *r, unsigned entries, unsigned flags){
  struct io_uring_params p; memset(&p,0,sizeof p); p.flags=flags;
  int fd=syscall(__NR_io_uring_setup,entries,&p); if(fd<0){perror("setup");exit(1);}
  size_t sqs=p.sq_off.array+p.sq_entries*4, cqs=p.cq_off.cqes+p.cq_entries*sizeof(struct io_uring_cqe); size_t sz=sqs>cqs?sqs:cqs;
  char *m=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,fd,IORING_OFF_SQ_RING);
  r->sqes=mmap(0,p.sq_entries*sizeof(struct io_uring_sqe),PROT_READ|PROT_WRITE,MAP_SHARED|MAP_POPULATE,fd,IORING_OFF_SQES);
  r->fd=fd; r->sq_head=(unsigned*)(m+p.sq_off.head); r->sq_tail=(unsigned*)(m+p.sq_off.tail); r->sq_mask=(unsigned*)(m+p.sq_off.ring_mask); r->sq_array=(unsigned*)(m+p.sq_off.array);
  r->cq_head=(unsigned*)(m+p.cq_off.head); r->cq_tail=(unsigned*)(m+p.cq_off.tail); r->cq_mask=(unsigned*)(m+p.cq_off.ring_mask); r->cqes=(struct io_uring_cqe*)(m+p.cq_off.cqes); r->entries=p.sq_entries;
  return 0;
}

int main(int argc,char**argv){
  const char*mode=argv[1]; N=atoi(argv[2]); int rounds=atoi(argv[3]); int gap=atoi(argv[4]); unsigned batch=argc>5?atoi(argv[5]):1024;
  struct rlimit rl={65536,65536}; setrlimit(RLIMIT_NOFILE,&rl);
  int ls=socket(AF_INET,SOCK_STREAM,0); int one=1; setsockopt(ls,SOL_SOCKET,SO_REUSEADDR,&one,4);
  struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001),.sin_port=0}; bind(ls,(void*)&a,sizeof a); listen(ls,4096);
  socklen_t al=sizeof a; getsockname(ls,(void*)&a,&al);
  int pfd[2]; pipe(pfd);
  pid_t child=fork();
  if(child==0){ // reader: connect N, epoll, recv
    close(pfd[0]);
    int ep=epoll_create1(0);
    for(int i=0;i<N;i++){int s=socket(AF_INET,SOCK_STREAM,0); if(connect(s,(void*)&a,sizeof a)){perror("connect");exit(1);} struct epoll_event e={.events=EPOLLIN|EPOLLET,.data.fd=s}; epoll_ctl(ep,EPOLL_CTL_ADD,s,&e);}
    write(pfd[1],"x",1);
    struct epoll_event ev[512]; char buf[65536];
    for(;;){int n=epoll_wait(ep,ev,512,-1); for(int i=0;i<n;i++){int fd=ev[i].data.fd; for(;;){ssize_t r=recv(fd,buf,sizeof buf,0); if(r<=0){ if(r==0) _exit(0); break;} if(r<(ssize_t)sizeof buf) break;}}}
  }
  int *fds=malloc(N*sizeof(int));
  for(int i=0;i<N;i++){fds[i]=accept4(ls,0,0,SOCK_NONBLOCK); setsockopt(fds[i],IPPROTO_TCP,TCP_NODELAY,&one,4);}
  char x; read(pfd[0],&x,1);
  char msg[100]; memset(msg,'a',100);
  struct ring r; int uring=strncmp(mode,"uring",5)==0; if(uring) ring_init(&r,4096,IORING_SETUP_COOP_TASKRUN|IORING_SETUP_SINGLE_ISSUER|IORING_SETUP_DEFER_TASKRUN);
  // warm-up
  for(int k=0;k<20;k++){for(int i=0;i<N;i++) send(fds[i],msg,100,MSG_NOSIGNAL); usleep(gap);}
  double c0=cpu_us(), s0=sys_us(); long failed=0;
  for(int k=0;k<rounds;k++){
    if(!uring){ for(int i=0;i<N;i++) if(send(fds[i],msg,100,MSG_NOSIGNAL)!=100) failed++; }
    else {
      int i=0;
      while(i<N){
        unsigned tail=*r.sq_tail; unsigned cnt=0;
        for(;i<N && cnt<batch;i++,cnt++){unsigned idx=(tail+cnt)&*r.sq_mask; struct io_uring_sqe*s=&r.sqes[idx]; memset(s,0,sizeof *s); s->opcode=IORING_OP_SEND; s->fd=fds[i]; s->addr=(unsigned long)msg; s->len=100; s->msg_flags=MSG_NOSIGNAL|MSG_DONTWAIT; s->user_data=i; r.sq_array[idx]=idx;}
        __atomic_store_n(r.sq_tail,tail+cnt,__ATOMIC_RELEASE);
        long e=syscall(__NR_io_uring_enter,r.fd,cnt,cnt,IORING_ENTER_GETEVENTS,0,0); if(e<0){perror("enter");exit(1);}
        unsigned h=*r.cq_head, t=__atomic_load_n(r.cq_tail,__ATOMIC_ACQUIRE); for(;h!=t;h++){ if(r.cqes[h&*r.cq_mask].res!=100) failed++; } __atomic_store_n(r.cq_head,h,__ATOMIC_RELEASE);
      }
    }
    usleep(gap);
  }
  double c1=cpu_us(), s1=sys_us();
  double sends=(double)rounds*N;
  printf("%s N=%d rounds=%d batch=%u: %.3f us/send (sys %.3f) failed %ld\n",mode,N,rounds,batch,(c1-c0)/sends,(s1-s0)/sends,failed);
  kill(child,SIGKILL); waitpid(child,0,0); return 0;
}
