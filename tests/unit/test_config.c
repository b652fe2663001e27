/*
 * test_config.c - the module's config reader: defaults, every key, and
 * errors that name the field.
 */
#include "check.h"
#include "config.h"

static const char *err_of(const char *json) {
  static char err[512];
  rp_config c;
  err[0] = '\0';
  if (rp_config_parse(json, &c, err, sizeof err) == 0) return NULL;
  return err;
}

int main(void) {
  rp_config c;
  char err[512];
  CHECK_EQ_INT(rp_config_parse("{}", &c, err, sizeof err), 0);
  CHECK_EQ_INT(c.stdio.queue_bytes, 8u << 20);
  CHECK_EQ_INT(c.stdio.max_streams, 16);
  CHECK_EQ_INT(c.broker.max_streams, 1024);
  CHECK_EQ_INT(c.stdio.overflow, RP_BLOCK);
  CHECK_EQ_INT(c.broker.allow_non_loopback, 0);
  CHECK_EQ_INT(rp_config_parse(
                   "{\"stdio\": {\"queue_bytes\": 65536, \"overflow\": "
                   "\"drop_newest\", \"block_timeout_ms\": 5, "
                   "\"coalesce_bytes\": 1024, \"max_message_bytes\": 4096, "
                   "\"flush_deadline_ms\": 7, \"max_streams\": 2}, "
                   "\"broker\": {\"max_streams\": 5, \"max_subchannels\": 3, \"max_pending_per_stream\": 9, "
                   "\"connect_timeout_ms\": 11, \"networks\": [\"tcp\"], "
                   "\"allow_non_loopback\": true}}",
                   &c, err, sizeof err),
               0);
  CHECK_EQ_INT(c.stdio.queue_bytes, 65536);
  CHECK_EQ_INT(c.stdio.overflow, RP_DROP_NEWEST);
  CHECK_EQ_INT(c.stdio.block_timeout_ms, 5);
  CHECK_EQ_INT(c.stdio.coalesce_bytes, 1024);
  CHECK_EQ_INT(c.stdio.max_message_bytes, 4096);
  CHECK_EQ_INT(c.stdio.flush_deadline_ms, 7);
  CHECK_EQ_INT(c.stdio.max_streams, 2);
  CHECK_EQ_INT(c.broker.max_streams, 5);
  CHECK_EQ_INT(c.broker.max_subchannels, 3);
  CHECK_EQ_INT(c.broker.max_pending_per_stream, 9);
  CHECK_EQ_INT(c.broker.connect_timeout_ms, 11);
  CHECK(!c.broker.allow_unix && c.broker.allow_tcp);
  CHECK_EQ_INT(c.broker.allow_non_loopback, 1);

  CHECK_CONTAINS(err_of("{\"stdio\": {\"overflow\": \"spill\"}}"),
                 "field \"config.stdio.overflow\": expected one of "
                 "\"block\", \"drop_oldest\", \"drop_newest\", got string "
                 "\"spill\"");
  CHECK_CONTAINS(err_of("{\"stdio\": {\"queue_bytes\": 10}}"),
                 "config.stdio.queue_bytes\": expected an integer from 4096");
  CHECK_CONTAINS(err_of("{\"stdio\": {\"queue_bytes\": 1e99}}"),
                 "config.stdio.queue_bytes");
  CHECK_CONTAINS(err_of("{\"stdio\": {\"queue_bytes\": 5000.5}}"),
                 "config.stdio.queue_bytes");
  CHECK_CONTAINS(err_of("{\"stdio\": {\"bogus\": 1}}"),
                 "unknown field \"config.stdio.bogus\"");
  CHECK_CONTAINS(err_of("{\"stdlo\": {}}"), "unknown field \"config.stdlo\"");
  CHECK_CONTAINS(err_of("{\"broker\": {\"networks\": [\"unix\", \"unix\"]}}"),
                 "field \"config.broker.networks[1]\": expected each network "
                 "once");
  CHECK_CONTAINS(err_of("{\"broker\": {\"networks\": [\"udp\"]}}"),
                 "field \"config.broker.networks[0]\": expected \"unix\" or "
                 "\"tcp\", got string \"udp\"");
  CHECK_CONTAINS(err_of("{\"broker\": {\"allow_non_loopback\": 1}}"),
                 "expected true or false, got number 1");
  CHECK_CONTAINS(err_of("{\"stdio\": 3}"),
                 "field \"config.stdio\": expected an object");
  CHECK_CONTAINS(err_of("{\"stdio\": {\"coalesce_bytes\": 9000, "
                        "\"max_message_bytes\": 4096}}"),
                 "coalesce_bytes");
  CHECK_CONTAINS(err_of("[]"), "field \"config\": expected an object");
  return check_report("test_config");
}
