/*
 * config.c - parse the manifest's "config" object into rp_config.
 */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "jsonfield.h"

void rp_config_defaults(rp_config *c) {
  memset(c, 0, sizeof *c);
  c->stdio.queue_bytes = 8u << 20;
  c->stdio.overflow = RP_BLOCK;
  c->stdio.block_timeout_ms = 0;
  c->stdio.max_message_bytes = 4u << 20; /* gRPC's default receive limit */
  c->stdio.coalesce_bytes = 0;
  c->stdio.flush_deadline_ms = 1000;
  c->stdio.max_streams = 16;
  c->broker.max_streams = 1024;
  c->broker.max_subchannels = 128;
  c->broker.max_pending_per_stream = 4096;
  c->broker.connect_timeout_ms = 5000;
  c->broker.allow_unix = 1;
  c->broker.allow_tcp = 1;
  c->broker.allow_non_loopback = 0;
}

static int parse_stdio(const cJSON *o, rp_config *c, jf_err e) {
  static const char *const keys[] = {
      "queue_bytes",    "overflow",          "block_timeout_ms",
      "max_message_bytes", "coalesce_bytes", "flush_deadline_ms",
      "max_streams", NULL};
  static const char *const policies[] = {"block", "drop_oldest",
                                         "drop_newest", NULL};
  long long v;
  if (jf_known_keys(o, "config.stdio", keys, e)) return -1;
  v = (long long)c->stdio.queue_bytes;
  if (jf_int(o, "config.stdio", "queue_bytes", 4096, 1LL << 34, &v, e))
    return -1;
  c->stdio.queue_bytes = (size_t)v;
  if (jf_enum(o, "config.stdio", "overflow", policies, &c->stdio.overflow, e))
    return -1;
  v = c->stdio.block_timeout_ms;
  if (jf_int(o, "config.stdio", "block_timeout_ms", 0, 86400000, &v, e))
    return -1;
  c->stdio.block_timeout_ms = (long)v;
  v = (long long)c->stdio.max_message_bytes;
  if (jf_int(o, "config.stdio", "max_message_bytes", 64, 1LL << 30, &v, e))
    return -1;
  c->stdio.max_message_bytes = (size_t)v;
  v = (long long)c->stdio.coalesce_bytes;
  if (jf_int(o, "config.stdio", "coalesce_bytes", 0, 1LL << 30, &v, e))
    return -1;
  c->stdio.coalesce_bytes = (size_t)v;
  v = c->stdio.flush_deadline_ms;
  if (jf_int(o, "config.stdio", "flush_deadline_ms", 0, 600000, &v, e))
    return -1;
  c->stdio.flush_deadline_ms = (long)v;
  v = c->stdio.max_streams;
  if (jf_int(o, "config.stdio", "max_streams", 1, 100000, &v, e)) return -1;
  c->stdio.max_streams = (unsigned)v;
  return 0;
}

static int parse_broker(const cJSON *o, rp_config *c, jf_err e) {
  static const char *const keys[] = {
      "max_streams", "max_subchannels", "max_pending_per_stream",
      "connect_timeout_ms", "networks", "allow_non_loopback", NULL};
  long long v;
  const cJSON *nets;
  if (jf_known_keys(o, "config.broker", keys, e)) return -1;
  v = c->broker.max_streams;
  if (jf_int(o, "config.broker", "max_streams", 1, 100000, &v, e)) return -1;
  c->broker.max_streams = (unsigned)v;
  v = c->broker.max_subchannels;
  if (jf_int(o, "config.broker", "max_subchannels", 0, 100000, &v, e))
    return -1;
  c->broker.max_subchannels = (unsigned)v;
  v = c->broker.max_pending_per_stream;
  if (jf_int(o, "config.broker", "max_pending_per_stream", 1, 1000000, &v, e))
    return -1;
  c->broker.max_pending_per_stream = (unsigned)v;
  v = c->broker.connect_timeout_ms;
  if (jf_int(o, "config.broker", "connect_timeout_ms", 1, 600000, &v, e))
    return -1;
  c->broker.connect_timeout_ms = (long)v;
  if (jf_bool(o, "config.broker", "allow_non_loopback",
              &c->broker.allow_non_loopback, e))
    return -1;
  nets = cJSON_GetObjectItemCaseSensitive(o, "networks");
  if (nets) {
    const cJSON *it;
    int idx = 0;
    if (!cJSON_IsArray(nets)) {
      jf_fail(e, "config.broker", "networks",
              "an array of \"unix\" and/or \"tcp\"", nets);
      return -1;
    }
    c->broker.allow_unix = c->broker.allow_tcp = 0;
    cJSON_ArrayForEach(it, nets) {
      char field[64];
      snprintf(field, sizeof field, "config.broker.networks[%d]", idx++);
      if (cJSON_IsString(it) && strcmp(it->valuestring, "unix") == 0 &&
          !c->broker.allow_unix)
        c->broker.allow_unix = 1;
      else if (cJSON_IsString(it) && strcmp(it->valuestring, "tcp") == 0 &&
               !c->broker.allow_tcp)
        c->broker.allow_tcp = 1;
      else if (cJSON_IsString(it) &&
               (strcmp(it->valuestring, "unix") == 0 ||
                strcmp(it->valuestring, "tcp") == 0)) {
        jf_fail(e, field, NULL, "each network once", it);
        return -1;
      } else {
        jf_fail(e, field, NULL, "\"unix\" or \"tcp\"", it);
        return -1;
      }
    }
  }
  return 0;
}

int rp_config_parse(const char *json, rp_config *c, char *err, size_t errlen) {
  static const char *const keys[] = {"stdio", "broker", NULL};
  jf_err e = {err, errlen};
  cJSON *root;
  const cJSON *o;
  int rc = -1;
  rp_config_defaults(c);
  if (json == NULL || *json == '\0') return 0;
  root = cJSON_Parse(json);
  if (root == NULL || !cJSON_IsObject(root)) {
    jf_fail(e, "config", NULL, "an object", root);
    cJSON_Delete(root);
    return -1;
  }
  if (jf_known_keys(root, "config", keys, e)) goto out;
  if (jf_object(root, "config", "stdio", &o, e)) goto out;
  if (o && parse_stdio(o, c, e)) goto out;
  if (jf_object(root, "config", "broker", &o, e)) goto out;
  if (o && parse_broker(o, c, e)) goto out;
  if (c->stdio.coalesce_bytes > c->stdio.max_message_bytes) {
    snprintf(err, errlen,
             "field \"config.stdio.coalesce_bytes\": expected at most "
             "config.stdio.max_message_bytes (%zu), got number %zu",
             c->stdio.max_message_bytes, c->stdio.coalesce_bytes);
    goto out;
  }
  rc = 0;
out:
  cJSON_Delete(root);
  return rc;
}
