/*
 * codec.c - protobuf-c <-> grpc_byte_buffer, and a direct StdioData
 * encoder for the stdio hot path (one allocation, one copy of the data).
 */
#include "codec.h"

#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

ProtobufCMessage *rp_decode(const ProtobufCMessageDescriptor *desc,
                            grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader reader;
  grpc_slice s;
  ProtobufCMessage *m;
  if (bb == NULL) return protobuf_c_message_unpack(desc, NULL, 0, NULL);
  if (!grpc_byte_buffer_reader_init(&reader, bb)) return NULL;
  s = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s),
                                GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  return m;
}

void rp_msg_free(ProtobufCMessage *msg) {
  if (msg) protobuf_c_message_free_unpacked(msg, NULL);
}

grpc_byte_buffer *rp_encode(const ProtobufCMessage *msg) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  grpc_slice s = grpc_slice_malloc(len);
  grpc_byte_buffer *bb;
  protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
  bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

size_t rp_put_varint(uint8_t *buf, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    buf[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  buf[n++] = (uint8_t)v;
  return n;
}

static size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

size_t rp_stdio_overhead(size_t len) {
  /* tag 0x08 + channel varint (1 byte for 1 and 2) + tag 0x12 + length */
  return 2 + 1 + varint_len(len);
}

grpc_slice rp_stdio_slice(int channel, size_t len, uint8_t **data) {
  /* Always heap-backed: *data must stay valid after the slice is returned
   * (a small grpc_slice_malloc would keep its bytes inline, in the copy). */
  grpc_slice s = grpc_slice_malloc_large(rp_stdio_overhead(len) + len);
  uint8_t *p = GRPC_SLICE_START_PTR(s);
  size_t off = 0;
  /* STDOUT and STDERR are never zero, so field 1 is always present. */
  p[off++] = 0x08; /* field 1, varint */
  off += rp_put_varint(p + off, (uint64_t)channel);
  p[off++] = 0x12; /* field 2, length-delimited */
  off += rp_put_varint(p + off, len);
  *data = p + off;
  return s;
}

static int get_varint(const uint8_t *p, size_t n, size_t *off, uint64_t *v) {
  unsigned shift = 0;
  *v = 0;
  while (*off < n && shift < 64) {
    uint8_t b = p[(*off)++];
    *v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) return 0;
    shift += 7;
  }
  return -1;
}

int rp_stdio_parse(const uint8_t *p, size_t n, int *channel,
                   const uint8_t **data, size_t *len) {
  size_t off = 0;
  uint64_t v;
  if (n < 2 || p[off++] != 0x08 || get_varint(p, n, &off, &v) || v > 2)
    return -1;
  *channel = (int)v;
  if (off >= n || p[off++] != 0x12 || get_varint(p, n, &off, &v) ||
      v != n - off)
    return -1;
  *data = p + off;
  *len = (size_t)v;
  return 0;
}
