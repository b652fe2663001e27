/*
 * jsonfield.h - typed, path-aware reading of cJSON objects.
 *
 * Shared by the manifest reader (host side) and the module's config reader,
 * so that both report a bad field the same way:
 *   field "stdio.queue_bytes": expected an integer from 4096 to 1073741824,
 *   got string "big"
 * Each getter returns 0 when the key is absent (leaving *out untouched) or
 * valid, and -1 with a sentence in err otherwise.  The caller prefixes the
 * file name.
 */
#ifndef RPCPLUGIN_JSONFIELD_H
#define RPCPLUGIN_JSONFIELD_H

#include <stddef.h>

#include <cjson/cJSON.h>

typedef struct jf_err {
  char *buf;
  size_t len;
} jf_err;

/* Any key of obj not in allowed (NULL-terminated) is an error. */
int jf_known_keys(const cJSON *obj, const char *path,
                  const char *const *allowed, jf_err e);
int jf_int(const cJSON *obj, const char *path, const char *key, long long min,
           long long max, long long *out, jf_err e);
int jf_bool(const cJSON *obj, const char *path, const char *key, int *out,
            jf_err e);
/* Non-empty string of at most maxlen bytes; *out points into obj. */
int jf_string(const cJSON *obj, const char *path, const char *key,
              size_t maxlen, const char **out, jf_err e);
/* One of choices (NULL-terminated); *out is its index. */
int jf_enum(const cJSON *obj, const char *path, const char *key,
            const char *const *choices, int *out, jf_err e);
/* An object (absent: *out = NULL). */
int jf_object(const cJSON *obj, const char *path, const char *key,
              const cJSON **out, jf_err e);
/* Describe a value for a message: `string "abc"`, `number 1.5`, ... */
void jf_describe(const cJSON *v, char *buf, size_t len);
/* "a.b" from path "a" and key "b" (path may be ""). */
void jf_join(char *buf, size_t len, const char *path, const char *key);
void jf_fail(jf_err e, const char *path, const char *key, const char *expected,
             const cJSON *got);

#endif
