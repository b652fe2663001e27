/*
 * codec.h - protobuf-c messages to and from grpc_byte_buffer.
 */
#ifndef RPCPLUGIN_CODEC_H
#define RPCPLUGIN_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <protobuf-c/protobuf-c.h>

/* Decode bb (NULL decodes as an empty message); NULL on malformed input
 * or out of memory.  bb is not consumed.  Free with rp_msg_free. */
ProtobufCMessage *rp_decode(const ProtobufCMessageDescriptor *desc,
                            grpc_byte_buffer *bb);
void rp_msg_free(ProtobufCMessage *msg);
/* Encode to a new byte buffer (NULL on out of memory). */
grpc_byte_buffer *rp_encode(const ProtobufCMessage *msg);

/* StdioData without building a message: allocate one slice holding field
 * 1 (channel) and the header of field 2 (data, len bytes); *data points
 * where the caller copies the len bytes.  The slice is exactly the encoded
 * message once they are copied. */
grpc_slice rp_stdio_slice(int channel, size_t len, uint8_t **data);
/* Read back a StdioData as rp_stdio_slice makes it (field 1 varint, then
 * field 2).  0, or -1 when it is not in that form. */
int rp_stdio_parse(const uint8_t *p, size_t n, int *channel,
                   const uint8_t **data, size_t *len);
/* Bytes of framing a StdioData adds to len bytes of data (at most 13). */
size_t rp_stdio_overhead(size_t len);

/* Base-128 varint; returns bytes written (buf needs 10). */
size_t rp_put_varint(uint8_t *buf, uint64_t v);

#endif
