/* libFuzzer: decoding every message type from arbitrary bytes, split
 * across slices at an input-chosen point; what decodes without unknown
 * fields (at any depth) re-encodes and decodes to the same bytes.  (protobuf-c keeps
 * unknown fields, even an illegal field 0, and re-emits them as it got
 * them; our replies are always built fresh, so that never reaches the
 * wire.) */
#include <stdint.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>

#include "codec.h"
#include "grpc_broker.pb-c.h"
#include "grpc_controller.pb-c.h"
#include "grpc_stdio.pb-c.h"
#include "health.pb-c.h"

static const ProtobufCMessageDescriptor *const descs[] = {
    &plugin__conn_info__descriptor, &plugin__stdio_data__descriptor,
    &plugin__empty__descriptor,
    &grpc__health__v1__health_check_request__descriptor,
    &grpc__health__v1__health_check_response__descriptor};

/* Unknown fields anywhere in m (single nested messages included). */
static int has_unknown(const ProtobufCMessage *m) {
  unsigned i;
  if (m->n_unknown_fields) return 1;
  for (i = 0; i < m->descriptor->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &m->descriptor->fields[i];
    if (f->type == PROTOBUF_C_TYPE_MESSAGE &&
        f->label != PROTOBUF_C_LABEL_REPEATED) {
      const ProtobufCMessage *sub =
          *(ProtobufCMessage *const *)((const char *)m + f->offset);
      if (sub && has_unknown(sub)) return 1;
    }
  }
  return 0;
}

static grpc_slice flatten(grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader r;
  grpc_slice s;
  grpc_byte_buffer_reader_init(&r, bb);
  s = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int init;
  size_t i, cut;
  grpc_slice parts[2];
  grpc_byte_buffer *bb;
  if (!init) {
    grpc_init();
    init = 1;
  }
  if (size < 1) return 0;
  cut = data[0] % (size);
  parts[0] = grpc_slice_from_copied_buffer((const char *)data + 1, cut);
  parts[1] = grpc_slice_from_copied_buffer((const char *)data + 1 + cut,
                                           size - 1 - cut);
  bb = grpc_raw_byte_buffer_create(parts, 2);
  for (i = 0; i < sizeof descs / sizeof descs[0]; i++) {
    ProtobufCMessage *m = rp_decode(descs[i], bb);
    if (m && !has_unknown(m)) {
      grpc_byte_buffer *again = rp_encode(m);
      ProtobufCMessage *m2 = rp_decode(descs[i], again);
      grpc_byte_buffer *third;
      grpc_slice a, b;
      if (m2 == NULL) __builtin_trap();
      third = rp_encode(m2);
      a = flatten(again);
      b = flatten(third);
      if (!grpc_slice_eq(a, b)) __builtin_trap();
      grpc_slice_unref(a);
      grpc_slice_unref(b);
      grpc_byte_buffer_destroy(again);
      grpc_byte_buffer_destroy(third);
      rp_msg_free(m2);
    }
    rp_msg_free(m);
  }
  grpc_byte_buffer_destroy(bb);
  grpc_slice_unref(parts[0]);
  grpc_slice_unref(parts[1]);
  return 0;
}
