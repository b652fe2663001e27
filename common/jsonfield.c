/*
 * jsonfield.c - see jsonfield.h.  cJSON keeps numbers as doubles; an integer
 * field accepts only numbers with no fractional part inside the range.
 */
#include "jsonfield.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void jf_join(char *buf, size_t len, const char *path, const char *key) {
  if (path && *path)
    snprintf(buf, len, "%s.%s", path, key);
  else
    snprintf(buf, len, "%s", key);
}

void jf_describe(const cJSON *v, char *buf, size_t len) {
  if (v == NULL) {
    snprintf(buf, len, "nothing");
  } else if (cJSON_IsString(v)) {
    const char *s = v->valuestring ? v->valuestring : "";
    if (strlen(s) > 40)
      snprintf(buf, len, "string \"%.40s...\"", s);
    else
      snprintf(buf, len, "string \"%s\"", s);
  } else if (cJSON_IsNumber(v)) {
    snprintf(buf, len, "number %g", v->valuedouble);
  } else if (cJSON_IsBool(v)) {
    snprintf(buf, len, "%s", cJSON_IsTrue(v) ? "true" : "false");
  } else if (cJSON_IsNull(v)) {
    snprintf(buf, len, "null");
  } else if (cJSON_IsArray(v)) {
    snprintf(buf, len, "an array");
  } else if (cJSON_IsObject(v)) {
    snprintf(buf, len, "an object");
  } else {
    snprintf(buf, len, "an invalid value");
  }
}

void jf_fail(jf_err e, const char *path, const char *key, const char *expected,
             const cJSON *got) {
  char field[256], desc[96];
  if (key)
    jf_join(field, sizeof field, path, key);
  else
    snprintf(field, sizeof field, "%s", path);
  jf_describe(got, desc, sizeof desc);
  snprintf(e.buf, e.len, "field \"%s\": expected %s, got %s", field, expected,
           desc);
}

int jf_known_keys(const cJSON *obj, const char *path,
                  const char *const *allowed, jf_err e) {
  const cJSON *it;
  cJSON_ArrayForEach(it, obj) {
    const char *const *a;
    int found = 0;
    for (a = allowed; *a; a++)
      if (it->string && strcmp(it->string, *a) == 0) found = 1;
    if (found && it->string) {
      const cJSON *prev;
      for (prev = obj->child; prev != it; prev = prev->next)
        if (prev->string && strcmp(prev->string, it->string) == 0) {
          char field[256];
          jf_join(field, sizeof field, path, it->string);
          snprintf(e.buf, e.len, "field \"%s\" appears more than once",
                   field);
          return -1;
        }
    }
    if (!found) {
      char field[256], list[512];
      size_t off = 0;
      jf_join(field, sizeof field, path, it->string ? it->string : "");
      list[0] = '\0';
      for (a = allowed; *a && off < sizeof list; a++)
        off += (size_t)snprintf(list + off, sizeof list - off, "%s\"%s\"",
                                a == allowed ? "" : ", ", *a);
      snprintf(e.buf, e.len, "unknown field \"%s\": expected one of %s", field,
               list);
      return -1;
    }
  }
  return 0;
}

int jf_int(const cJSON *obj, const char *path, const char *key, long long min,
           long long max, long long *out, jf_err e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  char expected[128];
  if (v == NULL) return 0;
  snprintf(expected, sizeof expected, "an integer from %lld to %lld", min, max);
  if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) ||
      floor(v->valuedouble) != v->valuedouble || v->valuedouble < (double)min ||
      v->valuedouble > (double)max) {
    jf_fail(e, path, key, expected, v);
    return -1;
  }
  *out = (long long)v->valuedouble;
  return 0;
}

int jf_bool(const cJSON *obj, const char *path, const char *key, int *out,
            jf_err e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (v == NULL) return 0;
  if (!cJSON_IsBool(v)) {
    jf_fail(e, path, key, "true or false", v);
    return -1;
  }
  *out = cJSON_IsTrue(v) ? 1 : 0;
  return 0;
}

int jf_string(const cJSON *obj, const char *path, const char *key,
              size_t maxlen, const char **out, jf_err e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  char expected[96];
  if (v == NULL) return 0;
  snprintf(expected, sizeof expected, "a non-empty string of at most %zu bytes",
           maxlen);
  if (!cJSON_IsString(v) || v->valuestring == NULL ||
      v->valuestring[0] == '\0' || strlen(v->valuestring) > maxlen) {
    jf_fail(e, path, key, expected, v);
    return -1;
  }
  *out = v->valuestring;
  return 0;
}

int jf_enum(const cJSON *obj, const char *path, const char *key,
            const char *const *choices, int *out, jf_err e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  char expected[256];
  size_t off = 0;
  int i;
  if (v == NULL) return 0;
  if (cJSON_IsString(v) && v->valuestring) {
    for (i = 0; choices[i]; i++)
      if (strcmp(v->valuestring, choices[i]) == 0) {
        *out = i;
        return 0;
      }
  }
  off += (size_t)snprintf(expected, sizeof expected, "one of ");
  for (i = 0; choices[i] && off < sizeof expected; i++)
    off += (size_t)snprintf(expected + off, sizeof expected - off, "%s\"%s\"",
                            i ? ", " : "", choices[i]);
  jf_fail(e, path, key, expected, v);
  return -1;
}

int jf_object(const cJSON *obj, const char *path, const char *key,
              const cJSON **out, jf_err e) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  *out = NULL;
  if (v == NULL) return 0;
  if (!cJSON_IsObject(v)) {
    jf_fail(e, path, key, "an object", v);
    return -1;
  }
  *out = v;
  return 0;
}
