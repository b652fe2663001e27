/*
 * errors.c - error codes (from RPCPLUGIN_ERRNO_MAP in rpcplugin.h) and the
 * sentence buffer every host call can fill.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

const char *rpcplugin_strerror(int code) {
  switch (code) {
#define RP_CASE(name, value, text) \
  case RPCPLUGIN_##name:           \
    return text;
    RPCPLUGIN_ERRNO_MAP(RP_CASE)
#undef RP_CASE
    default:
      return "unknown error";
  }
}

const char *rpcplugin_err_name(int code) {
  switch (code) {
#define RP_CASE(name, value, text) \
  case RPCPLUGIN_##name:           \
    return "RPCPLUGIN_" #name;
    RPCPLUGIN_ERRNO_MAP(RP_CASE)
#undef RP_CASE
    default:
      return "RPCPLUGIN_UNKNOWN";
  }
}

int rp_error(rpcplugin_error *err, int code, const char *fmt, ...) {
  if (err) {
    va_list ap;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
  }
  return code;
}

void rp_error_clear(rpcplugin_error *err) {
  if (err) {
    err->code = 0;
    err->message[0] = '\0';
  }
}
