/*
 * bench_util.c - see bench_util.h.
 */
#include "bench_util.h"

#include <dirent.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

uint64_t rpb_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static long status_field(pid_t pid, const char *key) {
  char path[64], line[256];
  size_t klen = strlen(key);
  long v = -1;
  FILE *f;
  if (pid == 0)
    snprintf(path, sizeof path, "/proc/self/status");
  else
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
  f = fopen(path, "r");
  if (f == NULL) return -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
      v = strtol(line + klen + 1, NULL, 10);
      break;
    }
  fclose(f);
  return v;
}

long rpb_rss_kb(pid_t pid) {
  return status_field(pid, "VmRSS");
}
long rpb_hwm_kb(pid_t pid) {
  return status_field(pid, "VmHWM");
}

int rpb_count_fds(pid_t pid) {
  char path[64];
  DIR *d;
  struct dirent *e;
  int n = 0;
  if (pid == 0)
    snprintf(path, sizeof path, "/proc/self/fd");
  else
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
  d = opendir(path);
  if (d == NULL) return -1;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return pid == 0 ? n - 1 : n; /* not the directory handle itself */
}

void rpb_cpu(double *user, double *sys, long *maxrss_kb) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  if (user) *user = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
  if (sys) *sys = (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  if (maxrss_kb) *maxrss_kb = ru.ru_maxrss;
}

void rpb_ctxsw(long *voluntary, long *involuntary) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  *voluntary = ru.ru_nvcsw;
  *involuntary = ru.ru_nivcsw;
}

void rpb_raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static pthread_mutex_t say_mu = PTHREAD_MUTEX_INITIALIZER;

void rpb_say(const char *fmt, ...) {
  va_list ap;
  pthread_mutex_lock(&say_mu);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
  pthread_mutex_unlock(&say_mu);
}

/* ---------------------------------------------------------------- wire */

size_t rpb_put_varint(uint8_t *buf, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    buf[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  buf[n++] = (uint8_t)v;
  return n;
}

size_t rpb_encode_stdio(uint8_t *out, int channel, const void *data,
                        size_t len) {
  size_t off = 0;
  out[off++] = 0x08;
  off += rpb_put_varint(out + off, (uint64_t)channel);
  out[off++] = 0x12;
  off += rpb_put_varint(out + off, len);
  memcpy(out + off, data, len);
  return off + len;
}

/* Read a varint from p[0..n); returns bytes used, 0 when malformed. */
static size_t get_varint(const uint8_t *p, size_t n, uint64_t *v) {
  size_t i;
  *v = 0;
  for (i = 0; i < n && i < 10; i++) {
    *v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
    if ((p[i] & 0x80) == 0) return i + 1;
  }
  return 0;
}

long rpb_stdio_data_len(grpc_byte_buffer *bb, int *channel) {
  /* Only the header is parsed: field 1 (varint), then field 2's length;
   * the data itself is never touched, so the client costs the same for
   * every server. */
  size_t total = grpc_byte_buffer_length(bb), off = 0, k;
  uint8_t head[16];
  uint64_t v;
  grpc_slice first = bb->data.raw.slice_buffer.count
                         ? bb->data.raw.slice_buffer.slices[0]
                         : grpc_empty_slice();
  size_t flen = GRPC_SLICE_LENGTH(first);
  if (flen >= sizeof head || flen == total) {
    size_t take = flen < sizeof head ? flen : sizeof head;
    memcpy(head, GRPC_SLICE_START_PTR(first), take);
    flen = take;
  } else {
    /* A split header: flatten (rare). */
    grpc_byte_buffer_reader r;
    grpc_slice all;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return -1;
    all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    flen = GRPC_SLICE_LENGTH(all) < sizeof head ? GRPC_SLICE_LENGTH(all)
                                                : sizeof head;
    memcpy(head, GRPC_SLICE_START_PTR(all), flen);
    grpc_slice_unref(all);
  }
  if (channel) *channel = 0;
  if (off < flen && head[off] == 0x08) {
    off++;
    k = get_varint(head + off, flen - off, &v);
    if (k == 0) return -1;
    off += k;
    if (channel) *channel = (int)v;
  }
  if (off >= flen) return total == off ? 0 : -1;
  if (head[off] != 0x12) return -1;
  off++;
  k = get_varint(head + off, flen - off, &v);
  if (k == 0) return -1;
  off += k;
  if (off + v != total) return -1;
  return (long)v;
}

static size_t put_string(uint8_t *p, int field, const char *s) {
  size_t n = 0, len = s ? strlen(s) : 0;
  if (len == 0) return 0;
  p[n++] = (uint8_t)(field << 3 | 2);
  n += rpb_put_varint(p + n, len);
  memcpy(p + n, s, len);
  return n + len;
}

grpc_byte_buffer *rpb_encode_conninfo(const rpb_conninfo *m) {
  uint8_t buf[1024], knock[400];
  size_t n = 0, kn = 0;
  grpc_slice s;
  grpc_byte_buffer *bb;
  if (m->service_id) {
    buf[n++] = 0x08;
    n += rpb_put_varint(buf + n, m->service_id);
  }
  n += put_string(buf + n, 2, m->network);
  n += put_string(buf + n, 3, m->address);
  if (m->has_knock) {
    if (m->knock) {
      knock[kn++] = 0x08;
      knock[kn++] = 1;
    }
    if (m->ack) {
      knock[kn++] = 0x10;
      knock[kn++] = 1;
    }
    kn += put_string(knock + kn, 3, m->error);
    buf[n++] = 0x22;
    n += rpb_put_varint(buf + n, kn);
    memcpy(buf + n, knock, kn);
    n += kn;
  }
  s = grpc_slice_from_copied_buffer((const char *)buf, n);
  bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

/* Walk the fields of p[0..n); for each, call back with number, wire type,
 * varint value or sub-buffer. */
static int walk(const uint8_t *p, size_t n, uint32_t *id, int *ack,
                int *has_error, int nested) {
  size_t off = 0, k;
  uint64_t key, v;
  while (off < n) {
    k = get_varint(p + off, n - off, &key);
    if (k == 0) return -1;
    off += k;
    switch (key & 7) {
      case 0:
        k = get_varint(p + off, n - off, &v);
        if (k == 0) return -1;
        off += k;
        if (!nested && (key >> 3) == 1) *id = (uint32_t)v;
        if (nested && (key >> 3) == 2) *ack = v != 0;
        break;
      case 2:
        k = get_varint(p + off, n - off, &v);
        if (k == 0 || off + k + v > n) return -1;
        off += k;
        if (!nested && (key >> 3) == 4) {
          if (walk(p + off, (size_t)v, id, ack, has_error, 1)) return -1;
        } else if (nested && (key >> 3) == 3 && v > 0) {
          *has_error = 1;
        }
        off += (size_t)v;
        break;
      default:
        return -1;
    }
  }
  return 0;
}

int rpb_decode_reply(grpc_byte_buffer *bb, uint32_t *id, int *ack,
                     int *has_error) {
  grpc_byte_buffer_reader r;
  grpc_slice all;
  int rc;
  *id = 0;
  *ack = 0;
  *has_error = 0;
  if (bb == NULL || !grpc_byte_buffer_reader_init(&r, bb)) return -1;
  all = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  rc = walk(GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), id, ack,
            has_error, 0);
  grpc_slice_unref(all);
  return rc;
}

/* --------------------------------------------------------------- stats */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

double rpb_quantile(double *v, size_t n, double q) {
  size_t i;
  if (n == 0) return 0;
  qsort(v, n, sizeof *v, cmp_double);
  i = (size_t)(q * (double)n);
  if (i >= n) i = n - 1;
  return v[i];
}

gpr_timespec rpb_deadline_ms(long ms) {
  return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                      gpr_time_from_millis(ms, GPR_TIMESPAN));
}

grpc_status_code rpb_unary_empty(grpc_channel *ch, grpc_completion_queue *cq,
                                 const char *method) {
  grpc_slice m = grpc_slice_from_static_string(method);
  grpc_call *call = grpc_channel_create_call(
      ch, NULL, 0, cq, m, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  grpc_slice empty = grpc_empty_slice();
  grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&empty, 0);
  grpc_byte_buffer *resp = NULL;
  grpc_metadata_array md, tmd;
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details;
  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  grpc_metadata_array_init(&md);
  grpc_metadata_array_init(&tmd);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(call, ops, 6, (void *)1, NULL) == GRPC_CALL_OK)
    grpc_completion_queue_pluck(cq, (void *)1,
                                gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  if (resp) grpc_byte_buffer_destroy(resp);
  grpc_byte_buffer_destroy(req);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md);
  grpc_metadata_array_destroy(&tmd);
  grpc_call_unref(call);
  return status;
}
