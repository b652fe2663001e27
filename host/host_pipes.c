/*
 * host_pipes.c - the reference host's stdout/stderr pipes and their reader.
 *
 * After the handshake the host's fds 1 and 2, and the child's, are the write
 * ends of two pipes.  One thread reads both and feeds put_line.  Throughput
 * comes from the chunking: each read takes whatever the pipe holds (the
 * pipes are enlarged to 1 MiB when the system allows), and everything up
 * to the last newline of the buffer goes to put_line as one chunk, so a
 * busy child costs one StdioData per read rather than one per line.  The
 * bytes after the last newline wait for the rest of their line; when the
 * pipe stays quiet for HOST_PIPES_IDLE_MS they go out as they are (a prompt
 * without a newline still arrives), and a buffer full of one long line is
 * handed over whole.  Chunks are at most max_chunk bytes (the host sets an
 * eighth of the stdio queue, since the drop policies cannot keep a chunk
 * larger than the queue), cut after a newline where the window has one.
 * Bytes are never altered, only cut.
 *
 * One thread for both pipes is enough: both channels end in the same
 * bounded queue, so when put_line blocks on a full queue the other channel
 * could not make progress either.
 *
 * Stopping does not wait for EOF (a grandchild that escaped the process
 * group may hold a write end forever): the reader switches to
 * non-blocking reads, takes what the pipes hold now, hands over partial
 * lines, and exits; the host bounds that with host_pipes_wait and then
 * shuts the runtime down, which turns a put_line still blocked into
 * RPCPLUGIN_ESHUTDOWN.
 */
#define _GNU_SOURCE
#include "host_tool.h"
#include "monotime.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <rpcplugin/rpcplugin.h>

#define BUF_BYTES (1u << 20)
#define PIPE_BYTES (1 << 20)

typedef struct chan {
  int channel;
  int rfd, wfd;
  uint8_t *buf;
  size_t len;
  int64_t last_ms; /* when the last bytes arrived */
  int eof;
} chan;

struct host_pipes {
  chan c[2];
  int wake_fd; /* eventfd: host_pipes_stop */
  host_pipes_sink sink;
  void *ctx;
  size_t max_chunk;
  pthread_t tid;
  int started;

  pthread_mutex_t mu;
  pthread_cond_t cv; /* CLOCK_MONOTONIC */
  int stop;
  int64_t deadline_ms;
  int done;
  int shut; /* the sink said RPCPLUGIN_ESHUTDOWN */
  host_pipes_stats st;
};

/* One chunk to the sink. */
static void put_chunk(host_pipes *p, int channel, const uint8_t *data,
                      size_t n) {
  int rc = RPCPLUGIN_ESHUTDOWN;
  if (!p->shut) rc = p->sink(p->ctx, channel, data, n);
  pthread_mutex_lock(&p->mu);
  if (rc == 0) {
    p->st.chunks_put++;
    p->st.bytes_put += n;
  } else {
    if (rc == RPCPLUGIN_ESHUTDOWN) p->shut = 1;
    p->st.chunks_lost++;
    p->st.bytes_lost += n;
  }
  pthread_mutex_unlock(&p->mu);
}

/* Hand the first n bytes of c's buffer to the sink, in chunks of at most
 * max_chunk cut after a newline where there is one, and keep the rest. */
static void deliver(host_pipes *p, chan *c, size_t n) {
  size_t off = 0;
  while (off < n) {
    size_t piece = n - off;
    if (piece > p->max_chunk) {
      const uint8_t *nl = memrchr(c->buf + off, '\n', p->max_chunk);
      piece = nl ? (size_t)(nl - (c->buf + off)) + 1 : p->max_chunk;
    }
    put_chunk(p, c->channel, c->buf + off, piece);
    off += piece;
  }
  memmove(c->buf, c->buf + n, c->len - n);
  c->len -= n;
}

/* Whole lines out; a partial line only when forced or the buffer is full. */
static void flush_chan(host_pipes *p, chan *c, int force) {
  const uint8_t *nl;
  if (c->len == 0) return;
  if (force || c->len == BUF_BYTES) {
    deliver(p, c, c->len);
    return;
  }
  nl = memrchr(c->buf, '\n', c->len);
  if (nl) deliver(p, c, (size_t)(nl - c->buf) + 1);
}

/* One read; 1 when bytes came, 0 at EOF or when nothing is there. */
static int read_chan(host_pipes *p, chan *c) {
  ssize_t n;
  if (c->eof || c->len == BUF_BYTES) return 0;
  do n = read(c->rfd, c->buf + c->len, BUF_BYTES - c->len);
  while (n < 0 && errno == EINTR);
  if (n > 0) {
    c->len += (size_t)n;
    c->last_ms = rp_mono_ms();
    pthread_mutex_lock(&p->mu);
    p->st.bytes_read += (uint64_t)n;
    pthread_mutex_unlock(&p->mu);
    return 1;
  }
  if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) c->eof = 1;
  return 0;
}

/* Stopping: take what the pipes hold now, bounded by the deadline. */
static void drain(host_pipes *p, int64_t deadline) {
  int i, more = 1;
  for (i = 0; i < 2; i++)
    if (!p->c[i].eof)
      fcntl(p->c[i].rfd, F_SETFL, fcntl(p->c[i].rfd, F_GETFL) | O_NONBLOCK);
  while (more && !p->shut && rp_mono_ms() < deadline) {
    more = 0;
    for (i = 0; i < 2; i++)
      if (read_chan(p, &p->c[i])) {
        more = 1;
        flush_chan(p, &p->c[i], 0);
      }
  }
  for (i = 0; i < 2; i++) flush_chan(p, &p->c[i], 1);
}

static void *reader_main(void *arg) {
  host_pipes *p = arg;
  int64_t deadline = 0;
  for (;;) {
    struct pollfd fds[3];
    int nfds = 0, idx[2] = {-1, -1}, i, timeout = -1;
    int64_t now = rp_mono_ms();
    int stop;

    pthread_mutex_lock(&p->mu);
    stop = p->stop;
    deadline = p->deadline_ms;
    pthread_mutex_unlock(&p->mu);
    if (stop) break;

    for (i = 0; i < 2; i++) {
      chan *c = &p->c[i];
      if (c->eof) continue;
      if (c->len > 0) {
        int64_t left = c->last_ms + HOST_PIPES_IDLE_MS - now;
        if (left <= 0) {
          flush_chan(p, c, 1);
        } else if (timeout < 0 || left < timeout) {
          timeout = (int)left;
        }
      }
      if (c->len < BUF_BYTES) {
        idx[i] = nfds;
        fds[nfds].fd = c->rfd;
        fds[nfds].events = POLLIN;
        nfds++;
      }
    }
    fds[nfds].fd = p->wake_fd;
    fds[nfds].events = POLLIN;
    nfds++;
    if (poll(fds, (nfds_t)nfds, timeout) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (i = 0; i < 2; i++)
      if (idx[i] >= 0 && fds[idx[i]].revents) {
        chan *c = &p->c[i];
        if (read_chan(p, c))
          flush_chan(p, c, 0);
        else if (c->eof)
          flush_chan(p, c, 1);
      }
  }
  drain(p, deadline);
  pthread_mutex_lock(&p->mu);
  p->done = 1;
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

int host_pipes_create(host_pipes **out, host_pipes_sink sink, void *ctx,
                      size_t max_chunk) {
  host_pipes *p = calloc(1, sizeof *p);
  int i, e;
  *out = NULL;
  if (p == NULL) return -ENOMEM;
  p->sink = sink;
  p->ctx = ctx;
  p->max_chunk = max_chunk == 0 ? BUF_BYTES : max_chunk;
  p->wake_fd = -1;
  for (i = 0; i < 2; i++) {
    int fds[2];
    chan *c = &p->c[i];
    c->channel = i + 1;
    c->rfd = c->wfd = -1;
    c->buf = malloc(BUF_BYTES);
    /* The read end stays private (close-on-exec); the write end is
     * inherited by the child through fd 1 or 2 after dup2. */
    if (c->buf == NULL || pipe2(fds, O_CLOEXEC) != 0) {
      e = c->buf ? errno : ENOMEM;
      goto fail;
    }
    c->rfd = fds[0];
    c->wfd = fds[1];
    /* Bigger pipes mean fewer, larger reads; best effort. */
    (void)fcntl(c->wfd, F_SETPIPE_SZ, PIPE_BYTES);
  }
  p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (p->wake_fd < 0) {
    e = errno;
    goto fail;
  }
  pthread_mutex_init(&p->mu, NULL);
  rp_cond_init_monotonic(&p->cv);
  *out = p;
  return 0;
fail:
  for (i = 0; i < 2; i++) {
    if (p->c[i].rfd >= 0) close(p->c[i].rfd);
    if (p->c[i].wfd >= 0) close(p->c[i].wfd);
    free(p->c[i].buf);
  }
  free(p);
  return -e;
}

int host_pipes_write_fd(host_pipes *p, int channel) {
  return (channel == 1 || channel == 2) ? p->c[channel - 1].wfd : -1;
}

void host_pipes_close_write(host_pipes *p) {
  int i;
  for (i = 0; i < 2; i++)
    if (p->c[i].wfd >= 0) {
      close(p->c[i].wfd);
      p->c[i].wfd = -1;
    }
}

int host_pipes_start(host_pipes *p) {
  int e = pthread_create(&p->tid, NULL, reader_main, p);
  if (e) return -e;
  p->started = 1;
  return 0;
}

void host_pipes_stop(host_pipes *p, long drain_ms) {
  uint64_t one = 1;
  pthread_mutex_lock(&p->mu);
  if (!p->stop) {
    p->stop = 1;
    p->deadline_ms = rp_mono_ms() + drain_ms;
  }
  pthread_mutex_unlock(&p->mu);
  (void)!write(p->wake_fd, &one, sizeof one);
}

int host_pipes_wait(host_pipes *p, long timeout_ms) {
  struct timespec dl;
  int done;
  if (!p->started) return 1;
  rp_deadline_after_ms(&dl, timeout_ms);
  pthread_mutex_lock(&p->mu);
  while (!p->done)
    if (pthread_cond_timedwait(&p->cv, &p->mu, &dl) == ETIMEDOUT) break;
  done = p->done;
  pthread_mutex_unlock(&p->mu);
  return done;
}

void host_pipes_destroy(host_pipes *p) {
  int i;
  if (p == NULL) return;
  if (p->started) {
    host_pipes_stop(p, 0);
    pthread_join(p->tid, NULL);
  }
  for (i = 0; i < 2; i++) {
    if (p->c[i].rfd >= 0) close(p->c[i].rfd);
    if (p->c[i].wfd >= 0) close(p->c[i].wfd);
    free(p->c[i].buf);
  }
  close(p->wake_fd);
  pthread_cond_destroy(&p->cv);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

void host_pipes_get_stats(host_pipes *p, host_pipes_stats *out) {
  pthread_mutex_lock(&p->mu);
  *out = p->st;
  pthread_mutex_unlock(&p->mu);
}
