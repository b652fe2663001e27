/*
 * test_codec.c - the protobuf-c <-> grpc_byte_buffer codec, and the direct
 * StdioData encoder against protobuf-c's own packing, byte for byte.
 */
#include <stdlib.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>

#include "check.h"
#include "codec.h"
#include "grpc_broker.pb-c.h"
#include "grpc_stdio.pb-c.h"
#include "health.pb-c.h"

static size_t bb_bytes(grpc_byte_buffer *bb, uint8_t *out, size_t cap) {
  grpc_byte_buffer_reader r;
  grpc_slice s;
  size_t n;
  grpc_byte_buffer_reader_init(&r, bb);
  s = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  n = GRPC_SLICE_LENGTH(s);
  if (n <= cap) memcpy(out, GRPC_SLICE_START_PTR(s), n);
  grpc_slice_unref(s);
  return n;
}

static void test_conninfo_roundtrip(void) {
  Plugin__ConnInfo m = PLUGIN__CONN_INFO__INIT;
  Plugin__ConnInfo__Knock k = PLUGIN__CONN_INFO__KNOCK__INIT;
  Plugin__ConnInfo *d;
  grpc_byte_buffer *bb;
  m.service_id = 4294967295u;
  m.network = "unix";
  m.address = "/tmp/x.sock";
  k.knock = 1;
  k.ack = 0;
  k.error = "e\xc3\xa9";
  m.knock = &k;
  bb = rp_encode(&m.base);
  CHECK(bb != NULL);
  d = (Plugin__ConnInfo *)rp_decode(&plugin__conn_info__descriptor, bb);
  CHECK(d != NULL);
  if (d) {
    CHECK(d->service_id == 4294967295u);
    CHECK(strcmp(d->network, "unix") == 0);
    CHECK(strcmp(d->address, "/tmp/x.sock") == 0);
    CHECK(d->knock && d->knock->knock && !d->knock->ack);
    CHECK(strcmp(d->knock->error, "e\xc3\xa9") == 0);
    rp_msg_free(&d->base);
  }
  grpc_byte_buffer_destroy(bb);
}

static void test_proto3_defaults_omitted(void) {
  /* proto3: zero fields are not on the wire, as Go's encoder does. */
  Plugin__ConnInfo m = PLUGIN__CONN_INFO__INIT;
  uint8_t out[64];
  grpc_byte_buffer *bb;
  m.service_id = 5;
  bb = rp_encode(&m.base);
  CHECK_EQ_INT(bb_bytes(bb, out, sizeof out), 2);
  CHECK(out[0] == 0x08 && out[1] == 0x05);
  grpc_byte_buffer_destroy(bb);
}

static void test_decode_garbage(void) {
  static const uint8_t bad[] = {0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01};
  grpc_slice s = grpc_slice_from_copied_buffer((const char *)bad, sizeof bad);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  CHECK(rp_decode(&plugin__conn_info__descriptor, bb) == NULL);
  grpc_byte_buffer_destroy(bb);
  grpc_slice_unref(s);
}

static void test_decode_null_is_empty(void) {
  ProtobufCMessage *m =
      rp_decode(&grpc__health__v1__health_check_request__descriptor, NULL);
  CHECK(m != NULL);
  if (m) {
    CHECK(strcmp(((Grpc__Health__V1__HealthCheckRequest *)m)->service, "") ==
          0);
    rp_msg_free(m);
  }
}

static void test_decode_multi_slice(void) {
  /* HealthCheckRequest{service: "plugin"} split across three slices. */
  static const char wire[] = "\x0a\x06plugin";
  grpc_slice parts[3];
  grpc_byte_buffer *bb;
  Grpc__Health__V1__HealthCheckRequest *r;
  parts[0] = grpc_slice_from_copied_buffer(wire, 1);
  parts[1] = grpc_slice_from_copied_buffer(wire + 1, 3);
  parts[2] = grpc_slice_from_copied_buffer(wire + 4, 4);
  bb = grpc_raw_byte_buffer_create(parts, 3);
  r = (Grpc__Health__V1__HealthCheckRequest *)rp_decode(
      &grpc__health__v1__health_check_request__descriptor, bb);
  CHECK(r && strcmp(r->service, "plugin") == 0);
  if (r) rp_msg_free(&r->base);
  grpc_byte_buffer_destroy(bb);
  grpc_slice_unref(parts[0]);
  grpc_slice_unref(parts[1]);
  grpc_slice_unref(parts[2]);
}

/* rp_stdio_slice must produce exactly what protobuf-c packs. */
static void stdio_case(int channel, size_t len) {
  uint8_t *data = malloc(len ? len : 1), *dst, *ref, *got;
  Plugin__StdioData m = PLUGIN__STDIO_DATA__INIT;
  size_t i, reflen;
  grpc_slice s;
  for (i = 0; i < len; i++) data[i] = (uint8_t)(i * 7 + 3);
  m.channel = (Plugin__StdioData__Channel)channel;
  m.data.data = data;
  m.data.len = len;
  reflen = plugin__stdio_data__get_packed_size(&m);
  ref = malloc(reflen);
  plugin__stdio_data__pack(&m, ref);
  s = rp_stdio_slice(channel, len, &dst);
  memcpy(dst, data, len);
  got = GRPC_SLICE_START_PTR(s);
  CHECK_EQ_INT(GRPC_SLICE_LENGTH(s), reflen);
  CHECK(GRPC_SLICE_LENGTH(s) == reflen && memcmp(got, ref, reflen) == 0);
  CHECK_EQ_INT(rp_stdio_overhead(len) + len, GRPC_SLICE_LENGTH(s));
  grpc_slice_unref(s);
  free(ref);
  free(data);
}

static void test_stdio_encoding(void) {
  static const size_t sizes[] = {1, 2, 64, 127, 128, 16383, 16384, 1 << 20,
                                 (1 << 21) + 5};
  size_t i;
  for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
    stdio_case(1, sizes[i]);
    stdio_case(2, sizes[i]);
  }
}

static void test_varint(void) {
  uint8_t b[10];
  CHECK_EQ_INT(rp_put_varint(b, 0), 1);
  CHECK_EQ_INT(rp_put_varint(b, 127), 1);
  CHECK_EQ_INT(rp_put_varint(b, 128), 2);
  CHECK(b[0] == 0x80 && b[1] == 0x01);
  CHECK_EQ_INT(rp_put_varint(b, UINT64_MAX), 10);
}

int main(void) {
  grpc_init();
  test_conninfo_roundtrip();
  test_proto3_defaults_omitted();
  test_decode_garbage();
  test_decode_null_is_empty();
  test_decode_multi_slice();
  test_stdio_encoding();
  test_varint();
  grpc_shutdown();
  return check_report("test_codec");
}
