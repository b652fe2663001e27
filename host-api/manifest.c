/*
 * manifest.c - read and validate a manifest (docs/manifest.md).
 *
 * The manifest is small, so it is read whole and parsed with cJSON.  Every
 * top-level key is checked here; "config" belongs to the module, which
 * validates it at init (the loader passes it on as compact JSON).  Every
 * error names the file, the field and what was expected.
 */
#define _GNU_SOURCE /* dladdr */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dlfcn.h>
#include <grp.h>
#include <pwd.h>

#include <cjson/cJSON.h>

#include "jsonfield.h"

/* A manifest larger than this is not a manifest. */
#define MANIFEST_MAX_BYTES (1024 * 1024)

struct rpcplugin_manifest {
  char *path;   /* as given, or "<memory>" */
  char *dir;    /* folder for relative module paths */
  char *name;
  char *module;
  char *config; /* compact JSON */
  int abi_major, abi_minor;
  int protocol_version;
  unsigned services;   /* infrastructure services, as bits */
  char **names;        /* every service named, in order */
  size_t nnames;
  char *infrastructure; /* "infrastructure", or NULL */
};

static const struct {
  const char *name;
  unsigned bit;
} service_names[] = {
    {"plugin.GRPCBroker", RPCPLUGIN_SVC_BROKER},
    {"plugin.GRPCStdio", RPCPLUGIN_SVC_STDIO},
    {"plugin.GRPCController", RPCPLUGIN_SVC_CONTROLLER},
    {"grpc.health.v1.Health", RPCPLUGIN_SVC_HEALTH},
};

const char *rp_service_name(unsigned bit) {
  size_t i;
  for (i = 0; i < sizeof service_names / sizeof service_names[0]; i++)
    if (service_names[i].bit == bit) return service_names[i].name;
  return NULL;
}

static const char *const top_keys[] = {
    "manifest_version", "name",     "description", "module", "abi_version",
    "protocol_version", "services", "config",      "$schema",
    "infrastructure",   NULL};

/* Line and column of byte offset `off` in text, 1-based. */
static void position(const char *text, size_t off, int *line, int *col) {
  size_t i;
  *line = 1;
  *col = 1;
  for (i = 0; i < off && text[i]; i++) {
    if (text[i] == '\n') {
      (*line)++;
      *col = 1;
    } else {
      (*col)++;
    }
  }
}

/* "MAJOR.MINOR": a major without a leading zero, a minor of 1 to 4 digits
 * (the schema's pattern says the same for major 1). */
static int parse_abi_version(const char *s, int *major, int *minor) {
  char *end;
  const char *m;
  long a, b;
  if (s[0] < '0' || s[0] > '9') return -1;
  if (s[0] == '0' && s[1] >= '0' && s[1] <= '9') return -1;
  a = strtol(s, &end, 10);
  if (*end != '.' || end[1] < '0' || end[1] > '9') return -1;
  m = end + 1;
  b = strtol(m, &end, 10);
  if (*end != '\0' || a > 65535 || end - m > 4) return -1;
  *major = (int)a;
  *minor = (int)b;
  return 0;
}

static int fail(rpcplugin_error *err, const char *origin, const char *msg) {
  return rp_error(err, RPCPLUGIN_EMANIFEST, "%s: %s", origin, msg);
}

/* A fully qualified gRPC service name: dot-separated identifiers. */
static int valid_service_name(const char *s) {
  int start = 1;
  size_t n = 0;
  for (; *s; s++, n++) {
    int c = (unsigned char)*s;
    if (c == '.') {
      if (start) return 0;
      start = 1;
      continue;
    }
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' ||
          (!start && c >= '0' && c <= '9')))
      return 0;
    start = 0;
  }
  return n > 0 && n <= 255 && !start;
}

/* "services": the four infrastructure services of go-plugin, or
 * application services (fully qualified gRPC names), not both. */
static int read_services(const cJSON *arr, const char *origin,
                         rpcplugin_manifest *m, rpcplugin_error *err) {
  const cJSON *it;
  char msg[512];
  int idx = 0, napp = 0;
  jf_err e = {msg, sizeof msg};
  size_t k;
  m->services = 0;
  if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0) {
    jf_fail(e, "services", NULL, "a non-empty array of service names", arr);
    return fail(err, origin, msg);
  }
  m->names = calloc((size_t)cJSON_GetArraySize(arr), sizeof *m->names);
  if (m->names == NULL)
    return rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", origin);
  cJSON_ArrayForEach(it, arr) {
    size_t i;
    unsigned bit = 0;
    char field[32];
    snprintf(field, sizeof field, "services[%d]", idx++);
    if (!cJSON_IsString(it) || !valid_service_name(it->valuestring)) {
      jf_fail(e, field, NULL,
              "a fully qualified gRPC service name: one of "
              "\"plugin.GRPCBroker\", \"plugin.GRPCStdio\", "
              "\"plugin.GRPCController\", \"grpc.health.v1.Health\", or "
              "an application service such as \"proto.KV\"",
              it);
      return fail(err, origin, msg);
    }
    for (k = 0; k < m->nnames; k++)
      if (strcmp(m->names[k], it->valuestring) == 0) {
        snprintf(msg, sizeof msg,
                 "field \"%s\": service \"%s\" listed twice", field,
                 it->valuestring);
        return fail(err, origin, msg);
      }
    for (i = 0; i < sizeof service_names / sizeof service_names[0]; i++)
      if (strcmp(it->valuestring, service_names[i].name) == 0)
        bit = service_names[i].bit;
    if (bit)
      m->services |= bit;
    else
      napp++;
    if ((m->names[m->nnames] = strdup(it->valuestring)) == NULL)
      return rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", origin);
    m->nnames++;
    if (m->services && napp) {
      snprintf(msg, sizeof msg,
               "field \"%s\": a manifest names either go-plugin's "
               "infrastructure services or application services, not both "
               "(an application's manifest pulls the infrastructure in "
               "with \"infrastructure\")",
               field);
      return fail(err, origin, msg);
    }
  }
  return 0;
}

static char *dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (slash == NULL) return strdup(".");
  if (slash == path) return strdup("/");
  return strndup(path, (size_t)(slash - path));
}

int rpcplugin_manifest_parse(const char *json, size_t len, const char *origin,
                             rpcplugin_manifest **out, rpcplugin_error *err) {
  cJSON *root;
  const char *parse_end = NULL;
  const char *name = NULL, *module = NULL, *abi = NULL, *desc = NULL;
  const char *schema = NULL, *infra = NULL;
  long long mv = 0, pv = 0;
  const cJSON *config = NULL, *v;
  char msg[512];
  jf_err e = {msg, sizeof msg};
  rpcplugin_manifest *m;
  int rc;

  rp_error_clear(err);
  if (out == NULL || json == NULL) return RPCPLUGIN_EINVAL;
  *out = NULL;
  if (origin == NULL) origin = "<memory>";

  root = cJSON_ParseWithLengthOpts(json, len, &parse_end, 0);
  if (root == NULL) {
    int line, col;
    size_t off = parse_end ? (size_t)(parse_end - json) : 0;
    position(json, off, &line, &col);
    snprintf(msg, sizeof msg, "not valid JSON (line %d, column %d)", line,
             col);
    return fail(err, origin, msg);
  }
  /* Trailing non-space text after the object is also an error. */
  if (parse_end) {
    const char *p = parse_end;
    while (p < json + len && (*p == ' ' || *p == '\n' || *p == '\r' ||
                              *p == '\t'))
      p++;
    if (p < json + len && *p != '\0') {
      int line, col;
      position(json, (size_t)(p - json), &line, &col);
      snprintf(msg, sizeof msg,
               "not valid JSON: unexpected text after the object (line %d, "
               "column %d)",
               line, col);
      cJSON_Delete(root);
      return fail(err, origin, msg);
    }
  }
  if (!cJSON_IsObject(root)) {
    jf_fail(e, "(top level)", NULL, "an object", root);
    cJSON_Delete(root);
    return fail(err, origin, msg);
  }

  if (jf_known_keys(root, "", top_keys, e) ||
      jf_int(root, "", "manifest_version", 0, INT_MAX, &mv, e) ||
      jf_string(root, "", "name", 128, &name, e) ||
      jf_string(root, "", "description", 4096, &desc, e) ||
      jf_string(root, "", "$schema", 4096, &schema, e) ||
      jf_string(root, "", "module", PATH_MAX - 1, &module, e) ||
      jf_string(root, "", "abi_version", 16, &abi, e) ||
      jf_int(root, "", "protocol_version", 0, INT_MAX, &pv, e) ||
      jf_string(root, "", "infrastructure", PATH_MAX - 1, &infra, e) ||
      jf_object(root, "", "config", &config, e)) {
    cJSON_Delete(root);
    return fail(err, origin, msg);
  }
  /* Required fields, in the documented order (docs/manifest.md). */
  {
    static const char *const required[] = {
        "manifest_version", "name",     "module", "abi_version",
        "protocol_version", "services", NULL};
    const char *const *r;
    for (r = required; *r; r++)
      if (cJSON_GetObjectItemCaseSensitive(root, *r) == NULL) {
        snprintf(msg, sizeof msg, "missing required field \"%s\"", *r);
        cJSON_Delete(root);
        return fail(err, origin, msg);
      }
  }
  if (mv != 1) {
    jf_fail(e, "manifest_version", NULL, "1",
            cJSON_GetObjectItemCaseSensitive(root, "manifest_version"));
    cJSON_Delete(root);
    return fail(err, origin, msg);
  }
  if (pv != 1) {
    jf_fail(e, "protocol_version", NULL,
            "1 (the go-plugin core protocol version)",
            cJSON_GetObjectItemCaseSensitive(root, "protocol_version"));
    cJSON_Delete(root);
    return fail(err, origin, msg);
  }

  m = calloc(1, sizeof *m);
  if (m == NULL) {
    cJSON_Delete(root);
    return rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", origin);
  }
  m->protocol_version = (int)pv;
  if (parse_abi_version(abi, &m->abi_major, &m->abi_minor) != 0) {
    jf_fail(e, "abi_version", NULL, "\"MAJOR.MINOR\", for example \"1.0\"",
            cJSON_GetObjectItemCaseSensitive(root, "abi_version"));
    rc = fail(err, origin, msg);
    goto out_err;
  }
  if (m->abi_major != RPCPLUGIN_ABI_MAJOR) {
    rc = rp_error(err, RPCPLUGIN_EABI,
                  "%s: field \"abi_version\": the module was built for ABI "
                  "%d.%d, this host speaks ABI %d.%d (majors must match)",
                  origin, m->abi_major, m->abi_minor, RPCPLUGIN_ABI_MAJOR,
                  RPCPLUGIN_ABI_MINOR);
    goto out_err;
  }
  v = cJSON_GetObjectItemCaseSensitive(root, "services");
  rc = read_services(v, origin, m, err);
  if (rc) goto out_err;
  if (infra && m->services) {
    rc = fail(err, origin,
              "field \"infrastructure\": only an application's manifest "
              "names an infrastructure manifest; this one lists "
              "infrastructure services itself");
    goto out_err;
  }
  if (infra && (m->infrastructure = strdup(infra)) == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", origin);
    goto out_err;
  }

  m->path = strdup(origin);
  m->dir = dir_of(origin);
  m->name = strdup(name);
  m->module = strdup(module);
  m->config = config ? cJSON_PrintUnformatted(config) : strdup("{}");
  if (!m->path || !m->dir || !m->name || !m->module || !m->config) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", origin);
    goto out_err;
  }
  cJSON_Delete(root);
  *out = m;
  return 0;

out_err:
  cJSON_Delete(root);
  rpcplugin_manifest_free(m);
  return rc;
}

int rpcplugin_manifest_load(const char *path, rpcplugin_manifest **out,
                            rpcplugin_error *err) {
  int fd, rc;
  struct stat st;
  char *buf;
  size_t got = 0;

  rp_error_clear(err);
  if (path == NULL || out == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL, "manifest path is NULL");
  *out = NULL;
  fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return rp_error(err, errno == ENOENT ? RPCPLUGIN_ENOENT : RPCPLUGIN_EIO,
                    "%s: cannot open manifest: %s", path, strerror(errno));
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return rp_error(err, RPCPLUGIN_EMANIFEST, "%s: not a regular file", path);
  }
  if ((rc = rp_check_trusted(&st, "manifest", path, NULL, err)) != 0) {
    close(fd);
    return rc;
  }
  if (st.st_size > MANIFEST_MAX_BYTES) {
    close(fd);
    return rp_error(err, RPCPLUGIN_EMANIFEST,
                    "%s: manifest is %lld bytes, more than the %d allowed",
                    path, (long long)st.st_size, MANIFEST_MAX_BYTES);
  }
  buf = malloc((size_t)st.st_size + 1);
  if (buf == NULL) {
    close(fd);
    return rp_error(err, RPCPLUGIN_ENOMEM, "%s: out of memory", path);
  }
  while (got < (size_t)st.st_size) {
    ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = '\0';
  if (memchr(buf, '\0', got) != NULL) {
    free(buf);
    return rp_error(err, RPCPLUGIN_EMANIFEST,
                    "%s: not valid JSON (contains a NUL byte)", path);
  }
  rc = rpcplugin_manifest_parse(buf, got, path, out, err);
  free(buf);
  return rc;
}

void rpcplugin_manifest_free(rpcplugin_manifest *m) {
  if (m == NULL) return;
  free(m->path);
  free(m->dir);
  free(m->name);
  free(m->module);
  free(m->config);
  if (m->names) {
    size_t i;
    for (i = 0; i < m->nnames; i++) free(m->names[i]);
    free(m->names);
  }
  free(m->infrastructure);
  free(m);
}

const char *rpcplugin_manifest_path(const rpcplugin_manifest *m) {
  return m->path;
}
const char *rp_manifest_dir(const rpcplugin_manifest *m) { return m->dir; }
const char *rpcplugin_manifest_name(const rpcplugin_manifest *m) {
  return m->name;
}
const char *rpcplugin_manifest_module(const rpcplugin_manifest *m) {
  return m->module;
}
int rpcplugin_manifest_protocol_version(const rpcplugin_manifest *m) {
  return m->protocol_version;
}
void rpcplugin_manifest_abi_version(const rpcplugin_manifest *m, int *major,
                                    int *minor) {
  if (major) *major = m->abi_major;
  if (minor) *minor = m->abi_minor;
}
unsigned rpcplugin_manifest_services(const rpcplugin_manifest *m) {
  return m->services;
}
const char *rpcplugin_manifest_config_json(const rpcplugin_manifest *m) {
  return m->config;
}

size_t rpcplugin_manifest_service_count(const rpcplugin_manifest *m) {
  return m->nnames;
}
const char *rpcplugin_manifest_service_name(const rpcplugin_manifest *m,
                                            size_t i) {
  return i < m->nnames ? m->names[i] : NULL;
}
int rpcplugin_manifest_is_application(const rpcplugin_manifest *m) {
  return m->services == 0;
}
const char *rpcplugin_manifest_infrastructure(const rpcplugin_manifest *m) {
  return m->infrastructure;
}

#ifndef RPCPLUGIN_MANIFEST_DIR
#define RPCPLUGIN_MANIFEST_DIR "/usr/local/share/rpcplugin/manifests"
#endif

/* dir/name exists as a regular file: path filled, 1. */
static int manifest_at(const char *dir, size_t dirlen, const char *name,
                       char *path, size_t pathlen) {
  struct stat st;
  if ((size_t)snprintf(path, pathlen, "%.*s/%s", (int)dirlen, dir, name) >=
      pathlen)
    return 0;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int rpcplugin_manifest_load_infrastructure(const rpcplugin_manifest *app,
                                           rpcplugin_manifest **out,
                                           rpcplugin_error *err) {
  const char *name, *env;
  char path[PATH_MAX], tried[1024] = "";
  size_t used = 0;
  rp_error_clear(err);
  if (app == NULL || out == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL, "manifest is NULL");
  *out = NULL;
  if (!rpcplugin_manifest_is_application(app))
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "%s: not an application manifest (it lists "
                    "infrastructure services itself)",
                    app->path);
  name = app->infrastructure ? app->infrastructure : "host.json";
  if (strchr(name, '/')) {
    int rc;
    if (name[0] == '/')
      snprintf(path, sizeof path, "%s", name);
    else
      snprintf(path, sizeof path, "%s/%s", app->dir, name);
    rc = rpcplugin_manifest_load(path, out, err);
    if (rc == RPCPLUGIN_ENOENT && err) { /* name the field, too */
      char why[sizeof err->message];
      snprintf(why, sizeof why, "%s", err->message);
      rp_error(err, rc, "%s: field \"infrastructure\": %s", app->path, why);
    }
    return rc;
  }
#define TRY(d, n)                                                          \
  do {                                                                     \
    if (manifest_at((d), (n), name, path, sizeof path))                    \
      return rpcplugin_manifest_load(path, out, err);                      \
    if (used < sizeof tried)                                               \
      used += (size_t)snprintf(tried + used, sizeof tried - used, "%s%.*s",\
                               used ? ", " : "", (int)(n), (d));           \
  } while (0)
  TRY(app->dir, strlen(app->dir));
  env = getenv("RPCPLUGIN_MANIFEST_PATH");
  while (env && *env) {
    const char *colon = strchr(env, ':');
    size_t n = colon ? (size_t)(colon - env) : strlen(env);
    if (n) TRY(env, n);
    env = colon ? colon + 1 : NULL;
  }
  {
    Dl_info info;
    if (dladdr((void *)rpcplugin_manifest_load_infrastructure, &info) &&
        info.dli_fname) {
      const char *slash = strrchr(info.dli_fname, '/');
      char dir[PATH_MAX];
      /* <libdir>/../share, and <libdir>/../../share for a multiarch
       * libdir (/usr/lib/x86_64-linux-gnu). */
      if (slash &&
          (size_t)snprintf(dir, sizeof dir, "%.*s/../share/rpcplugin/manifests",
                           (int)(slash - info.dli_fname),
                           info.dli_fname) < sizeof dir)
        TRY(dir, strlen(dir));
      if (slash && (size_t)snprintf(dir, sizeof dir,
                                    "%.*s/../../share/rpcplugin/manifests",
                                    (int)(slash - info.dli_fname),
                                    info.dli_fname) < sizeof dir)
        TRY(dir, strlen(dir));
    }
  }
  TRY(RPCPLUGIN_MANIFEST_DIR, strlen(RPCPLUGIN_MANIFEST_DIR));
#undef TRY
  return rp_error(err, RPCPLUGIN_ENOENT,
                  "%s: field \"infrastructure\": no manifest \"%s\" in %s",
                  app->path, name, tried);
}

/* ------------------------------------------------------------- trust */

static void user_name(uid_t uid, char *buf, size_t len) {
  struct passwd pw, *res = NULL;
  char tmp[1024];
  if (getpwuid_r(uid, &pw, tmp, sizeof tmp, &res) == 0 && res)
    snprintf(buf, len, "%s (uid %lu)", res->pw_name, (unsigned long)uid);
  else
    snprintf(buf, len, "uid %lu", (unsigned long)uid);
}

static void group_name(gid_t gid, char *buf, size_t len) {
  struct group gr, *res = NULL;
  char tmp[1024];
  if (getgrgid_r(gid, &gr, tmp, sizeof tmp, &res) == 0 && res)
    snprintf(buf, len, "%s (gid %lu)", res->gr_name, (unsigned long)gid);
  else
    snprintf(buf, len, "gid %lu", (unsigned long)gid);
}

int rp_check_trusted(const struct stat *st, const char *what,
                     const char *path, const char *where,
                     rpcplugin_error *err) {
  char who[300], me[300];
  const char *pre = where ? where : "", *sep = where ? ": " : "";
  unsigned mode = (unsigned)(st->st_mode & 07777);
  if (st->st_mode & S_IWOTH)
    return rp_error(err, RPCPLUGIN_EREFUSED,
                    "%s%s%s %s is writable by everyone (mode %04o); refusing "
                    "to load it: a %s must not be writable by group or others "
                    "(chmod go-w)",
                    pre, sep, what, path, mode, what);
  if (st->st_mode & S_IWGRP) {
    group_name(st->st_gid, who, sizeof who);
    return rp_error(err, RPCPLUGIN_EREFUSED,
                    "%s%s%s %s is writable by its group %s (mode %04o); "
                    "refusing to load it: a %s must not be writable by group "
                    "or others (chmod g-w)",
                    pre, sep, what, path, who, mode, what);
  }
  if (st->st_uid != 0 && st->st_uid != geteuid()) {
    user_name(st->st_uid, who, sizeof who);
    user_name(geteuid(), me, sizeof me);
    return rp_error(err, RPCPLUGIN_EREFUSED,
                    "%s%s%s %s is owned by %s; refusing to load it: a %s "
                    "must be owned by root or by the user the host runs as, "
                    "%s",
                    pre, sep, what, path, who, what, me);
  }
  return 0;
}
