/*
 * bench_util.h - small helpers shared by the benchmark programs: clocks,
 * process figures read from /proc and getrusage, a hand-written encoder and
 * decoder for the two messages the benchmarks speak (StdioData, ConnInfo),
 * and line I/O for the orchestrator's command protocol.
 *
 * Nothing here knows about rpcplugin: the anchors (the bare C-core servers)
 * link against it too, so every server is measured with the same tools.
 */
#ifndef RPB_BENCH_UTIL_H
#define RPB_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <grpc/grpc.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CLOCK_MONOTONIC in nanoseconds; comparable across processes. */
uint64_t rpb_now_ns(void);

/* /proc/PID/status fields in KiB (pid 0: this process); -1 on error. */
long rpb_rss_kb(pid_t pid);
long rpb_hwm_kb(pid_t pid);
/* Open descriptors of PID (0: this process); -1 on error. */
int rpb_count_fds(pid_t pid);
/* This process's user and system CPU seconds, and ru_maxrss (KiB). */
void rpb_cpu(double *user, double *sys, long *maxrss_kb);
/* This process's voluntary and involuntary context switches so far. */
void rpb_ctxsw(long *voluntary, long *involuntary);
/* Raise RLIMIT_NOFILE to its hard limit. */
void rpb_raise_nofile(void);

/* printf to stdout followed by a newline and a flush, under a lock. */
void rpb_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---------------------------------------------------------------- wire */

size_t rpb_put_varint(uint8_t *buf, uint64_t v);
/* Encode StdioData{channel, data} into out (room for len + 16).  Returns
 * the encoded length. */
size_t rpb_encode_stdio(uint8_t *out, int channel, const void *data,
                        size_t len);
/* Data bytes carried by one StdioData message; -1 when undecodable.
 * *channel (may be NULL) gets the channel field. */
long rpb_stdio_data_len(grpc_byte_buffer *bb, int *channel);

/* A ConnInfo with an optional knock. */
typedef struct rpb_conninfo {
  uint32_t service_id;
  const char *network;
  const char *address;
  int has_knock, knock, ack;
  const char *error;
} rpb_conninfo;
grpc_byte_buffer *rpb_encode_conninfo(const rpb_conninfo *m);
/* Decode the reply fields that matter to the benchmark: service_id,
 * knock.ack and whether knock.error is set.  Returns 0 or -1. */
int rpb_decode_reply(grpc_byte_buffer *bb, uint32_t *id, int *ack,
                     int *has_error);

/* --------------------------------------------------------------- stats */

/* Sort v (n values) and return the q-quantile (0..1), nearest rank. */
double rpb_quantile(double *v, size_t n, double q);

/* A gpr_timespec `ms` milliseconds from now (realtime clock). */
gpr_timespec rpb_deadline_ms(long ms);

/* One unary call with an empty request on `cq` (a pluck queue); returns
 * the status code. */
grpc_status_code rpb_unary_empty(grpc_channel *ch, grpc_completion_queue *cq,
                                 const char *method);

#ifdef __cplusplus
}
#endif

#endif /* RPB_BENCH_UTIL_H */
