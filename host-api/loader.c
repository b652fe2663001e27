/*
 * loader.c - find, open, check and start a module (docs/abi.md).
 *
 * Order of checks, each refusing with one exact sentence before anything
 * else of the module runs:
 *   1. resolve the manifest's "module" (its folder, the caller's search
 *      path, $RPCPLUGIN_MODULE_PATH, <libdir>/rpcplugin next to this
 *      library, the configured install folder) and open it;
 *   2. fstat the open descriptor: a regular file, not writable by everyone
 *      (checked on the descriptor, not by path, so the file checked is the
 *      file mapped: dlopen goes through /proc/self/fd/N);
 *   3. dlopen RTLD_NOW | RTLD_LOCAL, then dlsym the one entry symbol;
 *   4. the entry returns the descriptor: magic, ABI major ("host ABI 1.0,
 *      module ABI 2.0"), build tag, struct_size;
 *   5. only then init (with the manifest's config) and register_services.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef RPCPLUGIN_MODULE_DIR
#define RPCPLUGIN_MODULE_DIR "/usr/local/lib/rpcplugin"
#endif

struct rpcplugin_module {
  rpcplugin_runtime *rt;
  rp_binding *binding;
  void *dl;
  const rpcplugin_module_api *api;
  void *inst;
  char *path;
  int started;
  int shut;
  int keep_loaded; /* application calls outlived its shutdown */
  int fd;          /* the file dlopen mapped, open while loaded */
  unsigned services; /* the manifest's infrastructure services */
};

/* Try dir/name; on success *fd is open and path filled.  Returns 0, or
 * errno of the failure. */
static int try_open(const char *dir, const char *name, char *path,
                    size_t pathlen, int *fd) {
  int n;
  if (dir)
    n = snprintf(path, pathlen, "%s/%s", dir, name);
  else
    n = snprintf(path, pathlen, "%s", name);
  if (n < 0 || (size_t)n >= pathlen) return ENAMETOOLONG;
  *fd = open(path, O_RDONLY | O_CLOEXEC);
  return *fd < 0 ? errno : 0;
}

/* Append "dir" to a human list of places tried. */
static void note_tried(char *tried, size_t len, const char *what) {
  size_t used = strlen(tried);
  if (used + 4 < len)
    snprintf(tried + used, len - used, "%s%s", used ? ", " : "", what);
}

static int resolve_module(const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts, char *path,
                          size_t pathlen, int *fd, rpcplugin_error *err) {
  const char *name = rpcplugin_manifest_module(m);
  const char *mpath = rpcplugin_manifest_path(m);
  char tried[2048] = "";
  int e;

  if (strchr(name, '/')) {
    e = try_open(name[0] == '/' ? NULL : rp_manifest_dir(m), name, path,
                 pathlen, fd);
    if (e == 0) return 0;
    return rp_error(err, e == ENOENT ? RPCPLUGIN_ENOENT : RPCPLUGIN_EIO,
                    "%s: field \"module\": cannot open %s: %s", mpath, path,
                    strerror(e));
  }
  /* A bare file name: the manifest's folder, then the search path. */
  {
    /* The manifest's folder, up to 40 search-path entries, up to 20 from
     * $RPCPLUGIN_MODULE_PATH, <libdir>/rpcplugin and the configured folder:
     * at most 63 (more entries are ignored). */
    const char *dirs[64];
    char libdir[PATH_MAX];
    size_t nd = 0, i;
    char *envcopy = NULL;
    const char *env = getenv("RPCPLUGIN_MODULE_PATH");
    dirs[nd++] = rp_manifest_dir(m);
    if (opts && opts->struct_size >= offsetof(rpcplugin_load_options,
                                              search_path) +
                                         sizeof(opts->search_path) &&
        opts->search_path)
      for (i = 0; opts->search_path[i] && nd < 40; i++)
        dirs[nd++] = opts->search_path[i];
    if (env && *env) {
      char *save = NULL, *tok;
      envcopy = strdup(env);
      for (tok = envcopy ? strtok_r(envcopy, ":", &save) : NULL;
           tok && nd < 61; tok = strtok_r(NULL, ":", &save))
        dirs[nd++] = tok;
    }
    /* Next to this library: <libdir>/rpcplugin, wherever it was installed
     * (relocatable), then the folder configured at build time. */
    {
      Dl_info info;
      if (dladdr((void *)rpcplugin_module_load, &info) && info.dli_fname) {
        const char *slash = strrchr(info.dli_fname, '/');
        if (slash && (size_t)(slash - info.dli_fname) + 11 < sizeof libdir) {
          snprintf(libdir, sizeof libdir, "%.*s/rpcplugin",
                   (int)(slash - info.dli_fname), info.dli_fname);
          if (strcmp(libdir, RPCPLUGIN_MODULE_DIR) != 0) dirs[nd++] = libdir;
        }
      }
    }
    dirs[nd++] = RPCPLUGIN_MODULE_DIR;
    for (i = 0; i < nd; i++) {
      e = try_open(dirs[i], name, path, pathlen, fd);
      if (e == 0) {
        free(envcopy);
        return 0;
      }
      note_tried(tried, sizeof tried, dirs[i]);
      if (e != ENOENT && e != ENOTDIR) {
        int rc = rp_error(err, RPCPLUGIN_EIO,
                          "%s: field \"module\": cannot open %s: %s", mpath,
                          path, strerror(e));
        free(envcopy);
        return rc;
      }
    }
    free(envcopy);
  }
  return rp_error(err, RPCPLUGIN_ENOENT,
                  "%s: field \"module\": \"%s\" not found (looked in %s)",
                  mpath, name, tried);
}

/* Check the descriptor header; fills err naming both sides. */
static int check_header(const rpcplugin_module_api *api, const char *path,
                        rpcplugin_error *err) {
  char tag[RPCPLUGIN_ABI_TAG_SIZE + 1];
  if (api == NULL)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": %s() returned NULL", path,
                    RPCPLUGIN_ENTRY_NAME);
  if (api->magic != RPCPLUGIN_MODULE_MAGIC)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": bad magic 0x%08x (expected "
                    "0x%08x): not an rpcplugin module",
                    path, (unsigned)api->magic, RPCPLUGIN_MODULE_MAGIC);
  if (api->abi_major != RPCPLUGIN_ABI_MAJOR)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": ABI major mismatch (host ABI "
                    "%d.%d, module ABI %d.%d)",
                    path, RPCPLUGIN_ABI_MAJOR, RPCPLUGIN_ABI_MINOR,
                    (int)api->abi_major, (int)api->abi_minor);
  memcpy(tag, api->abi_tag, RPCPLUGIN_ABI_TAG_SIZE);
  tag[RPCPLUGIN_ABI_TAG_SIZE] = '\0';
  if (strcmp(tag, RPCPLUGIN_ABI_TAG) != 0)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": build mismatch (host "
                    "\"%s\", module \"%s\")",
                    path, RPCPLUGIN_ABI_TAG, tag);
  if (api->struct_size < RPCPLUGIN_MODULE_MIN_SIZE)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": vtable of %u bytes, ABI "
                    "%d.x needs at least %zu",
                    path, (unsigned)api->struct_size, RPCPLUGIN_ABI_MAJOR,
                    (size_t)RPCPLUGIN_MODULE_MIN_SIZE);
  if (api->init == NULL || api->register_services == NULL ||
      api->start == NULL || api->shutdown == NULL || api->destroy == NULL)
    return rp_error(err, RPCPLUGIN_EABI,
                    "incompatible module \"%s\": a required entry (init, "
                    "register_services, start, shutdown, destroy) is NULL",
                    path);
  return 0;
}

int rp_module_start(rpcplugin_module *mod) {
  int rc;
  if (mod->started) return 0;
  rc = mod->api->start(mod->inst);
  if (rc == 0) mod->started = 1;
  return rc;
}

int rpcplugin_module_load(rpcplugin_runtime *rt, const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts,
                          rpcplugin_module **out, rpcplugin_error *err) {
  char path[PATH_MAX], fdpath[64], msg[512];
  int fd = -1, rc;
  struct stat st;
  rpcplugin_module *mod;
  rpcplugin_module_entry_fn entry;
  rpcplugin_host_api host;
  const char **names = NULL;
  size_t nnames = 0, i;

  rp_error_clear(err);
  if (rt == NULL || m == NULL || out == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "rpcplugin_module_load: runtime, manifest and out needed");
  *out = NULL;
  rc = resolve_module(m, opts, path, sizeof path, &fd, err);
  if (rc) return rc;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return rp_error(err, RPCPLUGIN_EDLOPEN, "%s: module %s: not a regular file",
                    rpcplugin_manifest_path(m), path);
  }
  if (st.st_mode & S_IWOTH) {
    close(fd);
    return rp_error(err, RPCPLUGIN_EREFUSED,
                    "%s: module %s is writable by everyone; refusing to load "
                    "it",
                    rpcplugin_manifest_path(m), path);
  }

  mod = calloc(1, sizeof *mod);
  if (mod == NULL || (mod->path = strdup(path)) == NULL) {
    free(mod);
    close(fd);
    return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  }
  mod->rt = rt;
  mod->services = rpcplugin_manifest_services(m);
  snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
  dlerror();
  mod->dl = dlopen(fdpath, RTLD_NOW | RTLD_LOCAL);
  if (mod->dl == NULL && access("/proc/self/fd", F_OK) != 0)
    mod->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* no /proc */
  /* The descriptor stays open as long as the module is loaded: glibc
   * matches a new dlopen by name first, and "/proc/self/fd/N" of a
   * reused N would hand back the module loaded before under that name. */
  mod->fd = fd;
  if (mod->dl == NULL) {
    const char *why = dlerror();
    const char *colon = why ? strstr(why, ": ") : NULL;
    rc = rp_error(err, RPCPLUGIN_EDLOPEN, "%s: cannot load module %s: %s",
                  rpcplugin_manifest_path(m), path,
                  colon ? colon + 2 : (why ? why : "unknown dlopen error"));
    goto fail;
  }
  dlerror();
  *(void **)&entry = dlsym(mod->dl, RPCPLUGIN_ENTRY_NAME);
  if (entry == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOSYM,
                  "%s: no entry point %s in module %s",
                  rpcplugin_manifest_path(m), RPCPLUGIN_ENTRY_NAME, path);
    goto fail;
  }
  mod->api = entry();
  rc = check_header(mod->api, path, err);
  if (rc) goto fail;
  {
    int mmaj, mmin;
    rpcplugin_manifest_abi_version(m, &mmaj, &mmin);
    if (mmaj != mod->api->abi_major) {
      rc = rp_error(err, RPCPLUGIN_EABI,
                    "%s: field \"abi_version\" says %d.%d but module %s is "
                    "ABI %d.%d",
                    rpcplugin_manifest_path(m), mmaj, mmin, path,
                    (int)mod->api->abi_major, (int)mod->api->abi_minor);
      goto fail;
    }
  }

  mod->binding = rp_runtime_bind(rt, mod);
  if (mod->binding == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    goto fail;
  }
  rp_runtime_fill_host_api(mod->binding, &host);
  msg[0] = '\0';
  rc = mod->api->init(&host, rpcplugin_manifest_config_json(m), &mod->inst,
                      msg, sizeof msg);
  if (rc != 0) {
    rc = rp_error(err, rc, "%s: module %s: %s", rpcplugin_manifest_path(m),
                  path, msg[0] ? msg : rpcplugin_strerror(rc));
    goto fail;
  }

  nnames = rpcplugin_manifest_service_count(m);
  names = calloc(nnames ? nnames : 1, sizeof *names);
  if (names == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    goto fail;
  }
  for (i = 0; i < nnames; i++) names[i] = rpcplugin_manifest_service_name(m, i);
  msg[0] = '\0';
  rc = mod->api->register_services(mod->inst, names, nnames, msg, sizeof msg);
  free(names);
  names = NULL;
  if (rc != 0) {
    rc = rp_error(err, rc, "%s: module %s cannot register its services: %s",
                  rpcplugin_manifest_path(m), path,
                  msg[0] ? msg : rpcplugin_strerror(rc));
    goto fail;
  }
  if (rp_runtime_started(rt)) {
    rc = rp_module_start(mod);
    if (rc != 0) {
      rc = rp_error(err, rc, "%s: module %s failed to start: %s",
                    rpcplugin_manifest_path(m), path, rpcplugin_strerror(rc));
      goto fail;
    }
  }
  rp_runtime_add_module(rt, mod);
  rp_runtime_log(rt, RPCPLUGIN_LOG_DEBUG, "rpcplugin: loaded %s (%s %s)", path,
                 mod->api->name ? mod->api->name : "?",
                 mod->api->version ? mod->api->version : "?");
  *out = mod;
  return 0;

fail:
  free(names);
  if (mod->binding) rp_runtime_unroute(mod->binding);
  if (mod->inst) {
    mod->api->shutdown(mod->inst);
    mod->api->destroy(mod->inst);
  }
  if (mod->binding) rp_runtime_unbind(mod->binding);
  if (mod->dl) dlclose(mod->dl);
  close(mod->fd);
  free(mod->path);
  free(mod);
  return rc;
}

/* How long a module's handlers may take to finish its application calls
 * once they are cancelled and its shutdown returned. */
#define MODULE_CALLS_WAIT_MS 5000

int rp_module_shut(rpcplugin_module *mod) {
  int rc;
  size_t left;
  if (mod->shut) return 0;
  rp_runtime_unroute(mod->binding);
  /* Its application calls end (on_cancel runs); its shutdown then finishes
   * whatever it still holds. */
  rp_runtime_cancel_calls(mod->binding);
  rc = mod->api->shutdown(mod->inst);
  if (rc != 0) return rc;
  mod->shut = 1;
  left = rp_runtime_wait_calls(mod->binding, MODULE_CALLS_WAIT_MS);
  if (left > 0) {
    /* Its handlers still own calls whose callbacks would run its code:
     * keep it loaded rather than unmap code that may still run. */
    mod->keep_loaded = 1;
    rp_runtime_log(mod->rt, RPCPLUGIN_LOG_ERROR,
                   "rpcplugin: module %s did not finish %zu application "
                   "calls after its shutdown; it stays loaded",
                   mod->path, left);
  }
  return 0;
}

int rp_module_is_shut(const rpcplugin_module *mod) { return mod->shut; }

void rp_module_free(rpcplugin_module *mod) {
  rp_module_shut(mod);
  if (mod->keep_loaded) return; /* reported in rp_module_shut */
  mod->api->destroy(mod->inst);
  rp_runtime_unbind(mod->binding);
  dlclose(mod->dl);
  close(mod->fd);
  free(mod->path);
  free(mod);
}

int rpcplugin_module_unload(rpcplugin_module *mod) {
  rpcplugin_host_api host;
  int rc;
  if (mod == NULL) return RPCPLUGIN_EINVAL;
  rp_runtime_fill_host_api(mod->binding, &host);
  if (host.on_poller_thread(host.host_ctx)) return RPCPLUGIN_EWRONGTHREAD;
  rc = rp_module_shut(mod);
  if (rc != 0) return rc;
  rp_runtime_remove_module(mod->rt, mod);
  rp_module_free(mod);
  return 0;
}

const rpcplugin_module_api *rpcplugin_module_api_of(
    const rpcplugin_module *mod) {
  return mod->api;
}

void *rpcplugin_module_instance(const rpcplugin_module *mod) {
  return mod->inst;
}

unsigned rpcplugin_module_services_of(const rpcplugin_module *mod) {
  return mod->services;
}

const char *rpcplugin_module_path(const rpcplugin_module *mod) {
  return mod->path;
}

int rpcplugin_module_put_line(rpcplugin_module *mod, int channel,
                              const void *data, size_t len) {
  if (!RPCPLUGIN_MODULE_HAS(mod->api, put_line)) return RPCPLUGIN_EUNSUPPORTED;
  return mod->api->put_line(mod->inst, channel, data, len);
}

int rpcplugin_module_get_stats(rpcplugin_module *mod, rpcplugin_stats *out) {
  if (!RPCPLUGIN_MODULE_HAS(mod->api, get_stats)) return RPCPLUGIN_EUNSUPPORTED;
  return mod->api->get_stats(mod->inst, out);
}
