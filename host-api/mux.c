/*
 * mux.c - the plugin's side of go-plugin's gRPC broker multiplexing; see
 * mux.h for why each yamux stream is bridged byte for byte.
 *
 * Threads:
 *  - the I/O thread owns the yamux session (yamux.c is single-threaded)
 *    and every socket: the connection, the bridged local sockets, the dial
 *    listeners.  One poll(2) loop; other threads talk to it through a
 *    command list and an eventfd.
 *  - the dial thread turns each connection a plugin dial's channel makes to
 *    a dial socket into knock, ack, new stream: one at a time, as
 *    go-plugin's dialMutex does (the client gives the next stream it
 *    accepts to the id of the last knock it acked).
 *
 * Routing of streams the client opens (go-plugin's GRPCServerMuxer): the
 * first goes to the main server; a later one to the route of the oldest
 * knock acked and not yet used, else to the main server.
 *
 * Memory: what the client sends on a stream waits in that bridge's buffer
 * until the local socket takes it, at most the stream's receive window
 * (256 KiB; more is a protocol error).  What goes to the client waits in
 * the session's output queue; local sockets are not read while it holds
 * more than OUT_HIGH, and the connection is not read while it holds more
 * than OUT_MAX (a peer that pings and never reads).
 */
#define _GNU_SOURCE
#include "mux.h"
#include "monotime.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "internal.h"
#include "yamux.h"

#define OUT_HIGH (1u << 20)  /* stop reading local sockets above this */
#define OUT_MAX (8u << 20)   /* stop reading the connection above this */
#define READ_CHUNK (64u * 1024u)
#define MAX_KNOCKS 64        /* acked knocks waiting for their stream */
#define MAX_DIALERS 1024
#define KNOCK_TIMEOUT_MS 5000 /* go-plugin's knock waits 5 s for the ack */

typedef struct bridge {
  uint32_t sid;
  int fd;
  int connecting;   /* non-blocking connect(2) in progress */
  int local_eof;    /* the local side ended: FIN sent */
  int peer_fin;     /* the peer sent FIN: SHUT_WR once `in` is written */
  int wr_shut;
  int gone;         /* the stream is over on the session side */
  int discard;      /* the local side is gone: drop what the peer sends */
  uint8_t *in;      /* from the peer, not yet written locally */
  size_t in_len, in_off, in_cap;
  struct bridge *next;
} bridge;

typedef struct dialer {
  uint32_t id;
  int fd; /* listening */
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  struct dialer *next;
} dialer;

typedef struct route {
  uint32_t id;
  char network[16];
  char address[256];
  struct route *next;
} route;

typedef struct pending_dial {
  uint32_t id;
  int fd;
  struct pending_dial *next;
} pending_dial;

enum { CMD_OPEN, CMD_GO_AWAY, CMD_STOP };

typedef struct cmd {
  int kind;
  uint32_t id;
  int fd;
  int done;
  int result;
  struct cmd *next;
} cmd;

struct rp_mux {
  rpcplugin_mux_options o;
  char main_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
  char dial_dir[sizeof(((struct sockaddr_un *)0)->sun_path) - 16];
  rp_mux_knock_fn knock;
  void (*fallback_log)(void *ud, int level, const char *msg);
  void *knock_ud;
  int conn;
  int wake;
  pthread_t io_thread, dial_thread;
  int threads;

  /* Shared (mu). */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  cmd *cmds, **cmds_tail;
  route *routes;
  uint32_t knocks[MAX_KNOCKS];
  size_t knock_head, nknocks;
  dialer *dialers;
  size_t ndialers;
  int dialers_changed;
  pending_dial *dials, **dials_tail;
  int stopping;
  int ended;
  char end_reason[128];
  rpcplugin_mux_stats st;

  /* I/O thread only. */
  ymx_session *ys;
  bridge *bridges;
  size_t nbridges;
  int first_seen;
  int conn_eof;
  int go_away_sent;
  int64_t next_ping_ms;
  int ping_outstanding;
  uint32_t ping_seq;
  int flush_until_ms_set;
  int64_t flush_until_ms;
};

static void mux_log(rp_mux *m, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void mux_log(rp_mux *m, int level, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (m->o.log)
    m->o.log(m->o.ud, level, msg);
  else if (m->fallback_log)
    m->fallback_log(m->knock_ud, level, msg);
}

static void wake(rp_mux *m) {
  uint64_t one = 1;
  ssize_t r = write(m->wake, &one, sizeof one);
  (void)r;
}

static void set_end(rp_mux *m, const char *why) {
  int first;
  pthread_mutex_lock(&m->mu);
  first = !m->ended;
  if (first) {
    m->ended = 1;
    snprintf(m->end_reason, sizeof m->end_reason, "%s", why);
  }
  pthread_cond_broadcast(&m->cv);
  pthread_mutex_unlock(&m->mu);
  if (first && m->o.on_end) m->o.on_end(m->o.ud, why);
}

/* ----------------------------------------------------------- bridges */

static bridge *find_bridge(rp_mux *m, uint32_t sid) {
  bridge *b;
  for (b = m->bridges; b; b = b->next)
    if (b->sid == sid && !b->gone) return b;
  return NULL;
}

static void bridge_free(rp_mux *m, bridge *b) {
  bridge **pp;
  for (pp = &m->bridges; *pp; pp = &(*pp)->next)
    if (*pp == b) {
      *pp = b->next;
      break;
    }
  if (b->fd >= 0) close(b->fd);
  free(b->in);
  free(b);
  m->nbridges--;
  pthread_mutex_lock(&m->mu);
  m->st.streams_open = m->nbridges;
  pthread_mutex_unlock(&m->mu);
}

static bridge *bridge_new(rp_mux *m, uint32_t sid, int fd, int connecting) {
  bridge *b = calloc(1, sizeof *b);
  if (b == NULL) return NULL;
  b->sid = sid;
  b->fd = fd;
  b->connecting = connecting;
  b->next = m->bridges;
  m->bridges = b;
  m->nbridges++;
  pthread_mutex_lock(&m->mu);
  m->st.streams_open = m->nbridges;
  pthread_mutex_unlock(&m->mu);
  return b;
}

/* The stream is broken on the local side: reset it and forget it.  When
 * this side already sent FIN (the local side had ended), the peer may have
 * closed and forgotten the stream meanwhile (yamux logs an RST for a stream
 * it forgot): what it still sends is dropped until its FIN instead. */
static void bridge_abort(rp_mux *m, bridge *b) {
  if (!b->gone && b->local_eof) {
    if (b->in_len > b->in_off)
      ymx_consumed(m->ys, b->sid, b->in_len - b->in_off);
    b->in_len = b->in_off = 0;
    b->discard = 1;
    if (b->fd >= 0) {
      close(b->fd);
      b->fd = -1;
    }
    if (b->peer_fin) b->gone = 1;
    return;
  }
  if (!b->gone) ymx_reset(m->ys, b->sid);
  b->gone = 1;
  b->in_len = b->in_off = 0;
}

/* Write what the peer sent to the local socket; 0, or -1 when broken. */
static int bridge_flush_in(rp_mux *m, bridge *b) {
  while (b->in_off < b->in_len && !b->connecting && b->fd >= 0) {
    ssize_t n = send(b->fd, b->in + b->in_off, b->in_len - b->in_off,
                     MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    b->in_off += (size_t)n;
    if (!b->gone) ymx_consumed(m->ys, b->sid, (size_t)n);
  }
  if (b->in_off == b->in_len) b->in_off = b->in_len = 0;
  if (b->peer_fin && b->in_len == 0 && !b->wr_shut && !b->connecting &&
      b->fd >= 0) {
    shutdown(b->fd, SHUT_WR);
    b->wr_shut = 1;
  }
  return 0;
}

/* Read from the local socket into the stream, within its window. */
static int bridge_read_local(rp_mux *m, bridge *b) {
  uint8_t buf[READ_CHUNK];
  for (;;) {
    uint32_t win = ymx_send_window(m->ys, b->sid);
    size_t want = win < sizeof buf ? win : sizeof buf;
    ssize_t n;
    long w;
    if (want == 0 || ymx_out_pending(m->ys) >= OUT_HIGH) return 0;
    n = recv(b->fd, buf, want, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    if (n == 0) {
      b->local_eof = 1;
      ymx_close(m->ys, b->sid);
      if (b->peer_fin) b->gone = 1;
      return 0;
    }
    w = ymx_write(m->ys, b->sid, buf, (size_t)n);
    if (w != n) return -1; /* cannot happen: n <= window */
    pthread_mutex_lock(&m->mu);
    m->st.bytes_out += (uint64_t)n;
    pthread_mutex_unlock(&m->mu);
    if ((size_t)n < want) return 0; /* drained for now */
  }
}

/* A non-blocking connection to network/address (or the main socket). */
static int connect_local(const char *network, const char *address,
                         int *connecting) {
  int fd = -1;
  *connecting = 0;
  if (strcmp(network, "unix") == 0) {
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(address) >= sizeof a.sun_path) return -1;
    memcpy(a.sun_path, address, strlen(address));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
    if (errno == EINPROGRESS) {
      *connecting = 1;
      return fd;
    }
  } else if (strcmp(network, "tcp") == 0) {
    char host[256];
    const char *colon = strrchr(address, ':');
    struct sockaddr_storage ss;
    socklen_t len;
    size_t hl;
    long port;
    char *end;
    if (colon == NULL) return -1;
    hl = (size_t)(colon - address);
    if (hl >= sizeof host) return -1;
    memcpy(host, address, hl);
    host[hl] = '\0';
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
      memmove(host, host + 1, hl - 2);
      host[hl - 2] = '\0';
    }
    port = strtol(colon + 1, &end, 10);
    if (*end || port <= 0 || port > 65535) return -1;
    memset(&ss, 0, sizeof ss);
    if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&ss)->sin_addr) ==
        1) {
      ((struct sockaddr_in *)&ss)->sin_family = AF_INET;
      ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)port);
      len = sizeof(struct sockaddr_in);
    } else if (inet_pton(AF_INET6, host,
                         &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1) {
      ((struct sockaddr_in6 *)&ss)->sin6_family = AF_INET6;
      ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)port);
      len = sizeof(struct sockaddr_in6);
    } else {
      return -1; /* numeric addresses only: no resolver on this path */
    }
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (connect(fd, (struct sockaddr *)&ss, len) == 0) return fd;
    if (errno == EINPROGRESS) {
      *connecting = 1;
      return fd;
    }
  }
  if (fd >= 0) close(fd);
  return -1;
}

/* --------------------------------------------------- session callbacks */

static int on_open(void *ud, uint32_t id) {
  rp_mux *m = ud;
  char network[16] = "unix", address[256];
  uint32_t knocked = 0;
  int fd, connecting;
  snprintf(address, sizeof address, "%s", m->main_path);
  pthread_mutex_lock(&m->mu);
  if (m->stopping) {
    pthread_mutex_unlock(&m->mu);
    return -1;
  }
  if (m->first_seen && m->nknocks > 0) {
    route *r;
    knocked = m->knocks[m->knock_head];
    m->knock_head = (m->knock_head + 1) % MAX_KNOCKS;
    m->nknocks--;
    for (r = m->routes; r; r = r->next)
      if (r->id == knocked) break;
    if (r == NULL) { /* knocks are acked only for routed ids */
      m->st.streams_refused++;
      pthread_mutex_unlock(&m->mu);
      return -1;
    }
    snprintf(network, sizeof network, "%s", r->network);
    snprintf(address, sizeof address, "%s", r->address);
  }
  m->first_seen = 1;
  pthread_mutex_unlock(&m->mu);
  fd = connect_local(network, address, &connecting);
  if (fd < 0) {
    mux_log(m, RPCPLUGIN_LOG_INFO,
            "multiplexing: stream %u refused: cannot connect to %s %s",
            (unsigned)id, network, address);
    pthread_mutex_lock(&m->mu);
    m->st.streams_refused++;
    pthread_mutex_unlock(&m->mu);
    return -1;
  }
  if (bridge_new(m, id, fd, connecting) == NULL) {
    close(fd);
    return -1;
  }
  pthread_mutex_lock(&m->mu);
  m->st.streams_accepted++;
  if (knocked) m->st.streams_brokered++;
  pthread_mutex_unlock(&m->mu);
  return 0;
}

static void on_data(void *ud, uint32_t id, const uint8_t *p, size_t n) {
  rp_mux *m = ud;
  bridge *b = find_bridge(m, id);
  if (b == NULL || b->discard) {
    ymx_consumed(m->ys, id, n);
    return;
  }
  pthread_mutex_lock(&m->mu);
  m->st.bytes_in += n;
  pthread_mutex_unlock(&m->mu);
  if (b->in_len + n > b->in_cap) {
    size_t cap = b->in_cap ? b->in_cap : 16384;
    uint8_t *q;
    if (b->in_off > 0) { /* compact first */
      memmove(b->in, b->in + b->in_off, b->in_len - b->in_off);
      b->in_len -= b->in_off;
      b->in_off = 0;
    }
    while (cap < b->in_len + n) cap *= 2;
    if (cap != b->in_cap) {
      q = realloc(b->in, cap);
      if (q == NULL) {
        bridge_abort(m, b);
        return;
      }
      b->in = q;
      b->in_cap = cap;
    }
  }
  memcpy(b->in + b->in_len, p, n);
  b->in_len += n;
}

static void on_fin(void *ud, uint32_t id) {
  rp_mux *m = ud;
  bridge *b = find_bridge(m, id);
  if (b == NULL) return;
  b->peer_fin = 1;
  if (b->local_eof) b->gone = 1;
}

static void on_reset(void *ud, uint32_t id) {
  rp_mux *m = ud;
  bridge *b = find_bridge(m, id);
  if (b == NULL) return;
  b->gone = 1;
  b->in_len = b->in_off = 0;
  if (b->fd >= 0) {
    /* An abortive close: the local side sees a reset, as the peer did. */
    struct linger l = {1, 0};
    setsockopt(b->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }
}

static void on_closed(void *ud, uint32_t id) {
  rp_mux *m = ud;
  bridge *b = find_bridge(m, id);
  if (b) b->gone = 1;
}

static void on_go_away(void *ud, uint32_t code) {
  rp_mux *m = ud;
  pthread_mutex_lock(&m->mu);
  m->st.go_away_received = 1;
  m->st.go_away_code = code;
  pthread_mutex_unlock(&m->mu);
}

static void on_pong(void *ud, uint32_t opaque) {
  rp_mux *m = ud;
  if (opaque == m->ping_seq) m->ping_outstanding = 0;
}

/* ------------------------------------------------------------ commands */

static void run_commands(rp_mux *m) {
  cmd *c;
  for (;;) {
    pthread_mutex_lock(&m->mu);
    c = m->cmds;
    if (c) {
      m->cmds = c->next;
      if (m->cmds == NULL) m->cmds_tail = &m->cmds;
    }
    pthread_mutex_unlock(&m->mu);
    if (c == NULL) return;
    switch (c->kind) {
      case CMD_OPEN: {
        uint32_t sid;
        int rc = m->conn_eof ? YMX_EGOAWAY : ymx_open(m->ys, &sid);
        if (rc == 0 && bridge_new(m, sid, c->fd, 0) == NULL) {
          ymx_reset(m->ys, sid);
          rc = YMX_ENOMEM;
        }
        if (rc != 0) close(c->fd);
        c->result = rc;
        pthread_mutex_lock(&m->mu);
        if (rc == 0) m->st.streams_opened++;
        c->done = 1;
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        break; /* the dial thread frees c */
      }
      case CMD_GO_AWAY:
        if (!m->go_away_sent && !m->conn_eof) {
          ymx_go_away(m->ys, YMX_GOAWAY_NORMAL);
          m->go_away_sent = 1;
        }
        free(c);
        break;
      case CMD_STOP:
        if (!m->flush_until_ms_set) {
          m->flush_until_ms_set = 1;
          m->flush_until_ms = rp_mono_ms() + c->id;
        }
        free(c);
        break;
    }
  }
}

static int post(rp_mux *m, cmd *c) {
  pthread_mutex_lock(&m->mu);
  if (m->ended && c->kind == CMD_OPEN) {
    pthread_mutex_unlock(&m->mu);
    return -1;
  }
  c->next = NULL;
  *m->cmds_tail = c;
  m->cmds_tail = &c->next;
  pthread_mutex_unlock(&m->mu);
  wake(m);
  return 0;
}

/* ------------------------------------------------------------- the loop */

static int flush_out(rp_mux *m) {
  while (ymx_out_pending(m->ys) > 0) {
    const uint8_t *p;
    size_t len;
    ssize_t n;
    ymx_out_peek(m->ys, &p, &len);
    n = send(m->conn, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    ymx_out_drop(m->ys, (size_t)n);
  }
  return 0;
}

static void accept_dials(rp_mux *m, dialer *d) {
  for (;;) {
    int fd = accept4(d->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    pending_dial *pd;
    if (fd < 0) return;
    pd = calloc(1, sizeof *pd);
    if (pd == NULL) {
      close(fd);
      return;
    }
    pd->id = d->id;
    pd->fd = fd;
    pthread_mutex_lock(&m->mu);
    *m->dials_tail = pd;
    m->dials_tail = &pd->next;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
  }
}

typedef struct slot {
  int kind; /* 0 wake, 1 conn, 2 dialer, 3 bridge */
  void *obj;
} slot;

static void *io_main(void *arg) {
  rp_mux *m = arg;
  struct pollfd *pfd = NULL;
  slot *slots = NULL;
  size_t cap = 0;
  const char *why = NULL;
  uint8_t rbuf[READ_CHUNK];

  for (;;) {
    size_t n = 0, i, need;
    dialer *d;
    bridge *b, *nb;
    int timeout = -1, stopping, rc;
    int64_t now;

    run_commands(m);

    /* Finish bridges whose both sides are done, flush what is pending. */
    for (b = m->bridges; b; b = nb) {
      nb = b->next;
      if (b->in_len > b->in_off && bridge_flush_in(m, b) != 0)
        bridge_abort(m, b);
      if (b->gone && b->in_len == 0) bridge_free(m, b);
    }
    if (flush_out(m) != 0 && why == NULL) why = "write to the connection failed";
    if (why) break;

    now = rp_mono_ms();
    pthread_mutex_lock(&m->mu);
    stopping = m->stopping;
    pthread_mutex_unlock(&m->mu);
    if (m->flush_until_ms_set) {
      /* Stopping: done once nothing is left to forward, or at the
       * deadline. */
      int idle = ymx_out_pending(m->ys) == 0;
      for (b = m->bridges; b && idle; b = b->next)
        if (!b->local_eof && !b->gone && b->fd >= 0) {
          int avail = 0;
          struct pollfd q = {b->fd, POLLIN, 0};
          if (poll(&q, 1, 0) == 1 && (q.revents & POLLIN) &&
              ymx_send_window(m->ys, b->sid) > 0)
            avail = 1;
          if (avail) idle = 0;
        }
      if (idle || now >= m->flush_until_ms) {
        why = "stopped";
        break;
      }
      timeout = (int)(m->flush_until_ms - now);
      if (timeout > 20) timeout = 20;
    }
    if (m->o.keepalive_ms > 0 && !stopping) {
      if (now >= m->next_ping_ms) {
        if (m->ping_outstanding) {
          why = "keepalive: the client did not answer a ping";
          break;
        }
        ymx_ping(m->ys, ++m->ping_seq);
        m->ping_outstanding = 1;
        m->next_ping_ms = now + m->o.keepalive_ms;
        flush_out(m);
      }
      if (timeout < 0 || m->next_ping_ms - now < timeout)
        timeout = (int)(m->next_ping_ms - now);
    }

    pthread_mutex_lock(&m->mu);
    need = 2 + m->ndialers + m->nbridges;
    pthread_mutex_unlock(&m->mu);
    if (need > cap) {
      size_t nc = need * 2;
      struct pollfd *np = realloc(pfd, nc * sizeof *np);
      slot *ns;
      if (np == NULL) {
        why = "out of memory";
        break;
      }
      pfd = np;
      ns = realloc(slots, nc * sizeof *ns);
      if (ns == NULL) {
        why = "out of memory";
        break;
      }
      slots = ns;
      cap = nc;
    }
    pfd[n] = (struct pollfd){m->wake, POLLIN, 0};
    slots[n++] = (slot){0, NULL};
    pfd[n] = (struct pollfd){m->conn, 0, 0};
    if (!m->conn_eof && ymx_out_pending(m->ys) < OUT_MAX)
      pfd[n].events |= POLLIN;
    if (ymx_out_pending(m->ys) > 0) pfd[n].events |= POLLOUT;
    slots[n++] = (slot){1, NULL};
    pthread_mutex_lock(&m->mu);
    for (d = m->dialers; d && n < cap; d = d->next) {
      pfd[n] = (struct pollfd){d->fd, POLLIN, 0};
      slots[n++] = (slot){2, d};
    }
    pthread_mutex_unlock(&m->mu);
    for (b = m->bridges; b && n < cap; b = b->next) {
      short ev = 0;
      if (b->fd < 0) continue;
      if (b->connecting) {
        ev = POLLOUT;
      } else {
        if (b->in_len > b->in_off) ev |= POLLOUT;
        if (!b->local_eof && !b->gone &&
            ymx_send_window(m->ys, b->sid) > 0 &&
            ymx_out_pending(m->ys) < OUT_HIGH)
          ev |= POLLIN;
      }
      /* Nothing wanted from it now: left out, or a local side that hung
       * up (POLLHUP is reported whatever the events) would spin the loop
       * while its stream waits for the peer's FIN or window. */
      if (ev == 0) continue;
      pfd[n] = (struct pollfd){b->fd, ev, 0};
      slots[n++] = (slot){3, b};
    }

    rc = poll(pfd, n, timeout);
    if (rc < 0) {
      if (errno == EINTR) continue;
      why = "poll failed";
      break;
    }
    for (i = 0; i < n; i++) {
      short re = pfd[i].revents;
      if (re == 0) continue;
      switch (slots[i].kind) {
        case 0: {
          uint64_t v;
          ssize_t r = read(m->wake, &v, sizeof v);
          (void)r;
          break;
        }
        case 1:
          if (re & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(m->conn, rbuf, sizeof rbuf, MSG_DONTWAIT);
            if (r > 0) {
              if (ymx_feed(m->ys, rbuf, (size_t)r) != YMX_OK) {
                flush_out(m); /* the GO_AWAY(protocol error) */
                why = "the client broke the yamux protocol";
              }
            } else if (r == 0) {
              why = "the client closed the connection";
            } else if (errno != EAGAIN && errno != EWOULDBLOCK &&
                       errno != EINTR) {
              why = "the connection failed";
            }
          }
          if (!why && (re & POLLOUT) && flush_out(m) != 0)
            why = "write to the connection failed";
          break;
        case 2:
          accept_dials(m, slots[i].obj);
          break;
        case 3: {
          bridge *bb = slots[i].obj;
          /* A bridge freed earlier in this pass cannot be here: bridges
           * are freed only at the top of the loop. */
          if (bb->connecting) {
            int e = 0;
            socklen_t el = sizeof e;
            getsockopt(bb->fd, SOL_SOCKET, SO_ERROR, &e, &el);
            if (e != 0) {
              bridge_abort(m, bb);
              break;
            }
            bb->connecting = 0;
          }
          if ((re & POLLOUT) && bridge_flush_in(m, bb) != 0) {
            bridge_abort(m, bb);
            break;
          }
          if ((re & (POLLIN | POLLHUP | POLLERR)) && !bb->local_eof &&
              !bb->gone && bridge_read_local(m, bb) != 0)
            bridge_abort(m, bb);
          break;
        }
      }
      if (why) break;
    }
    if (why) break;
  }

  /* The session is over: the local sides see their connections end. */
  while (m->bridges) bridge_free(m, m->bridges);
  free(pfd);
  free(slots);
  pthread_mutex_lock(&m->mu);
  m->stopping = 1;
  pthread_mutex_unlock(&m->mu);
  set_end(m, why ? why : "ended");
  return NULL;
}

/* ------------------------------------------------------- dial thread */

static void *dial_main(void *arg) {
  rp_mux *m = arg;
  for (;;) {
    pending_dial *pd;
    char err[256];
    int rc;
    pthread_mutex_lock(&m->mu);
    while (m->dials == NULL && !m->stopping && !m->ended)
      pthread_cond_wait(&m->cv, &m->mu);
    pd = m->dials;
    if (pd == NULL) {
      pthread_mutex_unlock(&m->mu);
      break;
    }
    m->dials = pd->next;
    if (m->dials == NULL) m->dials_tail = &m->dials;
    pthread_mutex_unlock(&m->mu);
    if (m->stopping || m->ended) {
      close(pd->fd);
      free(pd);
      continue;
    }
    err[0] = '\0';
    rc = m->knock(m->knock_ud, pd->id, err, sizeof err);
    if (rc == 0) {
      cmd *c = calloc(1, sizeof *c);
      if (c == NULL) {
        rc = -1;
      } else {
        c->kind = CMD_OPEN;
        c->id = pd->id;
        c->fd = pd->fd;
        if (post(m, c) != 0) {
          free(c);
          rc = -1;
        } else {
          pd->fd = -1; /* the command owns it now */
          /* Wait until the stream's SYN is queued: the next knock must
           * not overtake it. */
          pthread_mutex_lock(&m->mu);
          while (!c->done && !m->ended) pthread_cond_wait(&m->cv, &m->mu);
          if (!c->done) {
            /* The session ended first; the I/O thread is gone, so the
             * command is ours to free (and its fd to close). */
            cmd **pp;
            for (pp = &m->cmds; *pp; pp = &(*pp)->next)
              if (*pp == c) {
                *pp = c->next;
                if (*pp == NULL) m->cmds_tail = pp;
                break;
              }
            close(c->fd);
            rc = -1;
          } else {
            rc = c->result;
          }
          pthread_mutex_unlock(&m->mu);
          free(c);
        }
      }
    } else {
      mux_log(m, RPCPLUGIN_LOG_INFO,
              "multiplexing: knock for id %u failed: %s", (unsigned)pd->id,
              err[0] ? err : rpcplugin_strerror(rc));
    }
    pthread_mutex_lock(&m->mu);
    m->st.dials++;
    if (rc != 0) m->st.dial_failures++;
    pthread_mutex_unlock(&m->mu);
    if (pd->fd >= 0) close(pd->fd);
    free(pd);
  }
  return NULL;
}

/* ------------------------------------------------------------- the API */

static const ymx_callbacks callbacks = {
    on_open, on_data, on_fin, on_reset, NULL, NULL, on_closed, on_go_away,
    on_pong};

int rp_mux_start(const rpcplugin_mux_options *o, rp_mux_knock_fn knock,
                 void (*log)(void *ud, int level, const char *msg),
                 void *knock_ud, rp_mux **out, rpcplugin_error *err) {
  rp_mux *m;
  ymx_config yc;
  *out = NULL;
  if (o == NULL || o->fd < 0 || o->main_path == NULL ||
      o->dial_dir == NULL ||
      strlen(o->main_path) >= sizeof(((rp_mux *)0)->main_path) ||
      strlen(o->dial_dir) + 16 >= sizeof(((dialer *)0)->path))
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "multiplex: fd, main_path and a short dial_dir are "
                    "needed");
  m = calloc(1, sizeof *m);
  if (m == NULL) return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  m->o = *o;
  if (m->o.keepalive_ms == 0) m->o.keepalive_ms = 30000;
  snprintf(m->main_path, sizeof m->main_path, "%s", o->main_path);
  snprintf(m->dial_dir, sizeof m->dial_dir, "%s", o->dial_dir);
  m->o.main_path = m->main_path;
  m->o.dial_dir = m->dial_dir;
  m->knock = knock;
  m->knock_ud = knock_ud;
  m->fallback_log = log;
  m->conn = o->fd;
  m->cmds_tail = &m->cmds;
  m->dials_tail = &m->dials;
  pthread_mutex_init(&m->mu, NULL);
  pthread_cond_init(&m->cv, NULL);
  m->st.struct_size = sizeof m->st;
  m->st.connections = 1;
  memset(&yc, 0, sizeof yc);
  yc.is_client = 0;
  yc.max_streams = o->max_streams;
  m->ys = ymx_new(&yc, &callbacks, m);
  m->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (m->ys == NULL || m->wake < 0) {
    if (m->wake >= 0) close(m->wake);
    ymx_free(m->ys);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cv);
    free(m);
    return rp_error(err, RPCPLUGIN_ENOMEM, "multiplex: out of resources");
  }
  {
    int fl = fcntl(m->conn, F_GETFL);
    if (fl >= 0) fcntl(m->conn, F_SETFL, fl | O_NONBLOCK);
  }
  *out = m;
  return 0;
}

int rp_mux_run(rp_mux *m, rpcplugin_error *err) {
  m->next_ping_ms = rp_mono_ms() + m->o.keepalive_ms;
  if (pthread_create(&m->io_thread, NULL, io_main, m) != 0) {
    set_end(m, "cannot start a thread");
    return rp_error(err, RPCPLUGIN_ENOMEM, "multiplex: cannot start a thread");
  }
  m->threads = 1;
  if (pthread_create(&m->dial_thread, NULL, dial_main, m) != 0) {
    rp_mux_stop(m, 0);
    return rp_error(err, RPCPLUGIN_ENOMEM, "multiplex: cannot start a thread");
  }
  m->threads = 2;
  return 0;
}

int rp_mux_accept_knock(rp_mux *m, uint32_t id, char *err, size_t errlen) {
  route *r;
  int rc = 0;
  pthread_mutex_lock(&m->mu);
  for (r = m->routes; r; r = r->next)
    if (r->id == id) break;
  if (r == NULL) {
    snprintf(err, errlen, "no listener for id %u", (unsigned)id);
    rc = RPCPLUGIN_ENOTFOUND;
  } else if (m->nknocks == MAX_KNOCKS) {
    snprintf(err, errlen, "too many knocks waiting for their stream");
    rc = RPCPLUGIN_ELIMIT;
  } else if (m->ended || m->stopping) {
    snprintf(err, errlen, "the plugin is shutting down");
    rc = RPCPLUGIN_ESHUTDOWN;
  } else {
    m->knocks[(m->knock_head + m->nknocks) % MAX_KNOCKS] = id;
    m->nknocks++;
    m->st.knocks_accepted++;
  }
  pthread_mutex_unlock(&m->mu);
  return rc;
}

int rp_mux_route(rp_mux *m, uint32_t id, const char *network,
                 const char *address) {
  route *r;
  if (id == 0 || network == NULL || address == NULL ||
      (strcmp(network, "unix") != 0 && strcmp(network, "tcp") != 0) ||
      address[0] == '\0' || strlen(address) > 255)
    return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&m->mu);
  for (r = m->routes; r; r = r->next)
    if (r->id == id) break;
  if (r == NULL) {
    r = calloc(1, sizeof *r);
    if (r == NULL) {
      pthread_mutex_unlock(&m->mu);
      return RPCPLUGIN_ENOMEM;
    }
    r->id = id;
    r->next = m->routes;
    m->routes = r;
  }
  snprintf(r->network, sizeof r->network, "%s", network);
  snprintf(r->address, sizeof r->address, "%s", address);
  pthread_mutex_unlock(&m->mu);
  return 0;
}

int rp_mux_dial_target(rp_mux *m, uint32_t id, char *target, size_t len,
                       rpcplugin_error *err) {
  dialer *d;
  int rc = 0;
  pthread_mutex_lock(&m->mu);
  for (d = m->dialers; d; d = d->next)
    if (d->id == id) break;
  if (d == NULL) {
    struct sockaddr_un a;
    if (m->ended || m->stopping) {
      rc = rp_error(err, RPCPLUGIN_ESHUTDOWN,
                    "multiplexing: the connection is closed");
    } else if (m->ndialers >= MAX_DIALERS) {
      rc = rp_error(err, RPCPLUGIN_ELIMIT,
                    "multiplexing: more than %d ids dialed", MAX_DIALERS);
    } else if ((d = calloc(1, sizeof *d)) == NULL) {
      rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    } else {
      d->id = id;
      snprintf(d->path, sizeof d->path, "%s/d%u", m->dial_dir, (unsigned)id);
      memset(&a, 0, sizeof a);
      a.sun_family = AF_UNIX;
      memcpy(a.sun_path, d->path, strlen(d->path));
      unlink(d->path);
      d->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (d->fd < 0 || bind(d->fd, (struct sockaddr *)&a, sizeof a) != 0 ||
          listen(d->fd, 64) != 0) {
        rc = rp_error(err, RPCPLUGIN_EIO, "multiplexing: cannot listen on "
                      "%s: %s", d->path, strerror(errno));
        if (d->fd >= 0) close(d->fd);
        free(d);
        d = NULL;
      } else {
        d->next = m->dialers;
        m->dialers = d;
        m->ndialers++;
      }
    }
  }
  if (d) snprintf(target, len, "unix:%s", d->path);
  pthread_mutex_unlock(&m->mu);
  if (d) wake(m); /* poll the new listener */
  return rc;
}

void rp_mux_go_away(rp_mux *m) {
  cmd *c = calloc(1, sizeof *c);
  if (c == NULL) return;
  c->kind = CMD_GO_AWAY;
  post(m, c);
}

void rp_mux_stop(rp_mux *m, int flush_ms) {
  cmd *c;
  if (m == NULL || m->threads == 0) return;
  pthread_mutex_lock(&m->mu);
  m->stopping = 1;
  pthread_cond_broadcast(&m->cv);
  pthread_mutex_unlock(&m->mu);
  c = calloc(1, sizeof *c);
  if (c) {
    c->kind = CMD_STOP;
    c->id = (uint32_t)(flush_ms > 0 ? flush_ms : 0);
    post(m, c);
  }
  pthread_join(m->io_thread, NULL);
  if (m->threads > 1) pthread_join(m->dial_thread, NULL);
  m->threads = 0;
}

void rp_mux_free(rp_mux *m) {
  dialer *d;
  route *r;
  pending_dial *pd;
  cmd *c;
  if (m == NULL) return;
  rp_mux_stop(m, 0);
  while ((d = m->dialers)) {
    m->dialers = d->next;
    close(d->fd);
    unlink(d->path);
    free(d);
  }
  while ((r = m->routes)) {
    m->routes = r->next;
    free(r);
  }
  while ((pd = m->dials)) {
    m->dials = pd->next;
    close(pd->fd);
    free(pd);
  }
  while ((c = m->cmds)) {
    m->cmds = c->next;
    if (c->kind == CMD_OPEN) close(c->fd);
    free(c);
  }
  ymx_free(m->ys);
  close(m->conn);
  close(m->wake);
  pthread_mutex_destroy(&m->mu);
  pthread_cond_destroy(&m->cv);
  free(m);
}

void rp_mux_get_stats(rp_mux *m, rpcplugin_mux_stats *out) {
  size_t sz = out->struct_size;
  pthread_mutex_lock(&m->mu);
  m->st.ended = m->ended;
  snprintf(m->st.end_reason, sizeof m->st.end_reason, "%s", m->end_reason);
  if (sz > sizeof *out || sz == 0) sz = sizeof *out;
  memcpy(out, &m->st, sz);
  out->struct_size = (uint32_t)sz;
  pthread_mutex_unlock(&m->mu);
}
