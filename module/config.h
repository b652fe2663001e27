/*
 * config.h - the module's settings, from the manifest's "config" object.
 *
 *   "stdio":  { "queue_bytes", "overflow", "block_timeout_ms",
 *               "max_message_bytes", "coalesce_bytes", "flush_deadline_ms",
 *               "max_streams" }
 *   "broker": { "max_streams", "max_subchannels", "max_pending_per_stream",
 *               "connect_timeout_ms", "networks", "allow_non_loopback" }
 *
 * Unknown keys and wrong types are errors naming the field.
 */
#ifndef RPCPLUGIN_CONFIG_H
#define RPCPLUGIN_CONFIG_H

#include <stddef.h>

enum rp_overflow { RP_BLOCK = 0, RP_DROP_OLDEST = 1, RP_DROP_NEWEST = 2 };

typedef struct rp_config {
  struct {
    size_t queue_bytes;       /* bound on queued chunk bytes */
    int overflow;             /* enum rp_overflow */
    long block_timeout_ms;    /* 0: wait as long as it takes */
    size_t max_message_bytes; /* encoded StdioData at most this */
    size_t coalesce_bytes;    /* 0: one message per chunk */
    long flush_deadline_ms;   /* shutdown waits this long for streams */
    unsigned max_streams;     /* StreamStdio streams open at once */
  } stdio;
  struct {
    unsigned max_streams; /* StartStream streams open at once */
    unsigned max_subchannels;
    unsigned max_pending_per_stream;
    long connect_timeout_ms;
    int allow_unix;
    int allow_tcp;
    int allow_non_loopback;
  } broker;
} rp_config;

void rp_config_defaults(rp_config *c);
/* 0, or -1 with "field \"stdio.overflow\": expected ..." in err. */
int rp_config_parse(const char *json, rp_config *c, char *err, size_t errlen);

#endif
