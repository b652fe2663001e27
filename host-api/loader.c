/*
 * loader.c - find, open, check and start a module (docs/abi.md).
 *
 * Order of checks, each refusing with one exact sentence before anything
 * else of the module runs:
 *   1. resolve the manifest's "module" (its folder, the caller's search
 *      path, $RPCPLUGIN_MODULE_PATH, <libdir>/rpcplugin next to this
 *      library, the configured install folder) and open it;
 *   2. fstat the open descriptor: a regular file, owned by root or the
 *      user the host runs as, not writable by group or others
 *      (checked on the descriptor, not by path, so the file checked is the
 *      file mapped: dlopen goes through /proc/self/fd/N);
 *   3. dlopen RTLD_NOW | RTLD_LOCAL, then dlsym the one entry symbol;
 *   4. the entry returns the descriptor: magic, ABI major ("host ABI 1.0,
 *      module ABI 2.0"), build tag, struct_size;
 *   5. only then init (with the manifest's config) and register_services.
 */
#define _GNU_SOURCE
#include "internal.h"
#include "mux.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The minor this host speaks (the ABI matrix tests build an older one). */
#ifdef RPCPLUGIN_TEST_HOST_ABI_1_1
#define RP_HOST_ABI_MINOR 1
#else
#define RP_HOST_ABI_MINOR RPCPLUGIN_ABI_MINOR
#endif

#ifndef RPCPLUGIN_MODULE_DIR
#define RPCPLUGIN_MODULE_DIR "/usr/local/lib/rpcplugin"
#endif

/* One loaded implementation: a file, its instance, its binding.  A swap
 * puts a new generation behind the same handle. */
typedef struct rp_gen {
  rp_binding *binding;
  void *dl;
  const rpcplugin_module_api *api;
  void *inst;
  char *path;
  int started;
  int shut;
  int keep_loaded; /* application calls outlived its shutdown */
  int fd;          /* the file dlopen mapped, open while loaded */
  dev_t dev;       /* the file resolved (before any private copy) */
  ino_t ino;
  int users;       /* host threads inside one of its entries (mod->mu) */
  char **names;    /* the manifest's service names */
  size_t nnames;
} rp_gen;

struct rpcplugin_module {
  rpcplugin_runtime *rt;
  pthread_mutex_t mu; /* cur, users; cv: a generation's users left */
  pthread_cond_t cv;
  rp_gen *cur;
  rp_gen *old;   /* the generation a swap retires, while it does */
  int swapping;
  unsigned services; /* the manifest's infrastructure services */
  int app;           /* an application manifest */
  unsigned long swaps;
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
                    path, RPCPLUGIN_ABI_MAJOR, RP_HOST_ABI_MINOR,
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

/* ------------------------------------------------------ generations */

static int gen_start(rp_gen *g) {
  int rc;
  if (g->started) return 0;
  rc = g->api->start(g->inst);
  if (rc == 0) g->started = 1;
  return rc;
}

int rp_module_start(rpcplugin_module *mod) { return gen_start(mod->cur); }

/* A private copy of the file open at fd, in a memfd: glibc hands back the
 * object already loaded when a new dlopen names a file with the same device
 * and inode, so a module loaded again from the same file (a reload, a swap
 * back) would share the old code instead of running the file as it is now.
 * Returns the memfd, or -1 with errno. */
static int private_copy(int fd) {
  char buf[65536];
  off_t off = 0;
  int mfd = memfd_create("rpcplugin-module", MFD_CLOEXEC);
  if (mfd < 0) return -1;
  for (;;) {
    ssize_t n = pread(fd, buf, sizeof buf, off), w = 0;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) goto fail;
    if (n == 0) break;
    while (w < n) {
      ssize_t k = write(mfd, buf + w, (size_t)(n - w));
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) goto fail;
      w += k;
    }
    off += n;
  }
  return mfd;
fail : {
  int e = errno;
  close(mfd);
  errno = e ? e : EIO;
  return -1;
}
}

static void gen_free_names(rp_gen *g) {
  size_t i;
  for (i = 0; i < g->nnames; i++) free(g->names[i]);
  free(g->names);
  g->names = NULL;
  g->nnames = 0;
}

/* Undo a generation that init or register did not finish. */
static void gen_discard(rp_gen *g) {
  if (g->binding) rp_runtime_unroute(g->binding);
  if (g->inst) {
    g->api->shutdown(g->inst);
    g->api->destroy(g->inst);
  }
  if (g->binding) rp_runtime_unbind(g->binding);
  if (g->dl) dlclose(g->dl);
  if (g->fd >= 0) close(g->fd);
  gen_free_names(g);
  free(g->path);
  free(g);
}

/* Load, check, init and register the implementation manifest m names, as
 * one generation of mod.  staged: its routes wait for a commit (a swap);
 * otherwise they take effect at once.  The caller has validated rt, m. */
static int gen_load(rpcplugin_runtime *rt, rpcplugin_module *mod,
                    const rpcplugin_manifest *m,
                    const rpcplugin_load_options *opts, int staged,
                    rp_gen **out, rpcplugin_error *err) {
  char path[PATH_MAX], fdpath[64], msg[512];
  int fd = -1, rc;
  struct stat st;
  rp_gen *g;
  rpcplugin_module_entry_fn entry;
  rpcplugin_host_api host;
  const char **names = NULL;
  size_t nnames = 0, i;

  *out = NULL;
  rc = resolve_module(m, opts, path, sizeof path, &fd, err);
  if (rc) return rc;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return rp_error(err, RPCPLUGIN_EDLOPEN, "%s: module %s: not a regular file",
                    rpcplugin_manifest_path(m), path);
  }
  if ((rc = rp_check_trusted(&st, "module", path,
                             rpcplugin_manifest_path(m), err)) != 0) {
    close(fd);
    return rc;
  }
  if (rp_runtime_file_loaded(rt, st.st_dev, st.st_ino)) {
    /* The same file is loaded already (a reload, a swap back to it): load
     * it from a private copy of what was checked, so that the new
     * generation runs the file as it is now, in its own mapping. */
    int mfd = private_copy(fd);
    if (mfd < 0) {
      int e = errno;
      close(fd);
      return rp_error(err, RPCPLUGIN_EIO,
                      "%s: module %s: cannot make a private copy to load it "
                      "again: %s",
                      rpcplugin_manifest_path(m), path, strerror(e));
    }
    close(fd);
    fd = mfd;
  }

  g = calloc(1, sizeof *g);
  if (g == NULL || (g->path = strdup(path)) == NULL) {
    free(g);
    close(fd);
    return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  }
  g->fd = fd;
  g->dev = st.st_dev;
  g->ino = st.st_ino;
  snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
  dlerror();
  g->dl = dlopen(fdpath, RTLD_NOW | RTLD_LOCAL);
  if (g->dl == NULL && access("/proc/self/fd", F_OK) != 0)
    g->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL); /* no /proc */
  /* The descriptor stays open as long as the module is loaded: glibc
   * matches a new dlopen by name first, and "/proc/self/fd/N" of a
   * reused N would hand back the module loaded before under that name. */
  if (g->dl == NULL) {
    const char *why = dlerror();
    const char *colon = why ? strstr(why, ": ") : NULL;
    rc = rp_error(err, RPCPLUGIN_EDLOPEN, "%s: cannot load module %s: %s",
                  rpcplugin_manifest_path(m), path,
                  colon ? colon + 2 : (why ? why : "unknown dlopen error"));
    goto fail;
  }
  dlerror();
  *(void **)&entry = dlsym(g->dl, RPCPLUGIN_ENTRY_NAME);
  if (entry == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOSYM,
                  "%s: no entry point %s in module %s",
                  rpcplugin_manifest_path(m), RPCPLUGIN_ENTRY_NAME, path);
    goto fail;
  }
  g->api = entry();
  rc = check_header(g->api, path, err);
  if (rc) goto fail;
  {
    int mmaj, mmin;
    rpcplugin_manifest_abi_version(m, &mmaj, &mmin);
    if (mmaj != g->api->abi_major) {
      rc = rp_error(err, RPCPLUGIN_EABI,
                    "%s: field \"abi_version\" says %d.%d but module %s is "
                    "ABI %d.%d",
                    rpcplugin_manifest_path(m), mmaj, mmin, path,
                    (int)g->api->abi_major, (int)g->api->abi_minor);
      goto fail;
    }
  }

  nnames = rpcplugin_manifest_service_count(m);
  g->names = calloc(nnames ? nnames : 1, sizeof *g->names);
  names = calloc(nnames ? nnames : 1, sizeof *names);
  if (g->names == NULL || names == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    goto fail;
  }
  for (i = 0; i < nnames; i++) {
    names[i] = rpcplugin_manifest_service_name(m, i);
    if ((g->names[i] = strdup(names[i])) == NULL) {
      rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
      goto fail;
    }
    g->nnames = i + 1;
  }

  g->binding = rp_runtime_bind(rt, mod);
  if (g->binding == NULL) {
    rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    goto fail;
  }
  if (staged) rp_runtime_stage(g->binding);
  rp_runtime_fill_host_api(g->binding, &host);
  msg[0] = '\0';
  rc = g->api->init(&host, rpcplugin_manifest_config_json(m), &g->inst, msg,
                    sizeof msg);
  if (rc != 0) {
    g->inst = NULL;
    rc = rp_error(err, rc, "%s: module %s: %s", rpcplugin_manifest_path(m),
                  path, msg[0] ? msg : rpcplugin_strerror(rc));
    goto fail;
  }
  msg[0] = '\0';
  rc = g->api->register_services(g->inst, names, nnames, msg, sizeof msg);
  if (rc != 0) {
    rc = rp_error(err, rc, "%s: module %s cannot register its services: %s",
                  rpcplugin_manifest_path(m), path,
                  msg[0] ? msg : rpcplugin_strerror(rc));
    goto fail;
  }
  free(names);
  names = NULL;
  if (rp_runtime_started(rt)) {
    rc = gen_start(g);
    if (rc != 0) {
      rc = rp_error(err, rc, "%s: module %s failed to start: %s",
                    rpcplugin_manifest_path(m), path, rpcplugin_strerror(rc));
      goto fail;
    }
  }
  *out = g;
  return 0;

fail:
  free(names);
  gen_discard(g);
  return rc;
}

int rpcplugin_module_load(rpcplugin_runtime *rt, const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts,
                          rpcplugin_module **out, rpcplugin_error *err) {
  rpcplugin_module *mod;
  rp_gen *g;
  int rc;

  rp_error_clear(err);
  if (rt == NULL || m == NULL || out == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "rpcplugin_module_load: runtime, manifest and out needed");
  *out = NULL;
  mod = calloc(1, sizeof *mod);
  if (mod == NULL) return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  mod->rt = rt;
  mod->services = rpcplugin_manifest_services(m);
  mod->app = rpcplugin_manifest_is_application(m);
  pthread_mutex_init(&mod->mu, NULL);
  pthread_cond_init(&mod->cv, NULL);
  rc = gen_load(rt, mod, m, opts, 0, &g, err);
  if (rc != 0) {
    pthread_cond_destroy(&mod->cv);
    pthread_mutex_destroy(&mod->mu);
    free(mod);
    return rc;
  }
  mod->cur = g;
  rp_runtime_add_module(rt, mod);
  rp_runtime_log(rt, RPCPLUGIN_LOG_DEBUG, "rpcplugin: loaded %s (%s %s)",
                 g->path, g->api->name ? g->api->name : "?",
                 g->api->version ? g->api->version : "?");
  *out = mod;
  return 0;
}

/* How long a module's handlers may take to finish its application calls
 * once they are cancelled and its shutdown returned. */
#define MODULE_CALLS_WAIT_MS 5000

static int gen_shut(rpcplugin_runtime *rt, rp_gen *g) {
  int rc;
  size_t left;
  if (g->shut) return 0;
  rp_runtime_unroute(g->binding);
  /* Its application calls end (on_cancel runs); its shutdown then finishes
   * whatever it still holds. */
  rp_runtime_cancel_calls(g->binding);
  rc = g->api->shutdown(g->inst);
  if (rc != 0) return rc;
  g->shut = 1;
  left = rp_runtime_wait_calls(g->binding, MODULE_CALLS_WAIT_MS);
  if (left > 0) {
    /* Its handlers still own calls whose callbacks would run its code:
     * keep it loaded rather than unmap code that may still run. */
    g->keep_loaded = 1;
    rp_runtime_log(rt, RPCPLUGIN_LOG_ERROR,
                   "rpcplugin: module %s did not finish %zu application "
                   "calls after its shutdown; it stays loaded",
                   g->path, left);
  }
  return 0;
}

static void gen_free(rpcplugin_runtime *rt, rp_gen *g) {
  gen_shut(rt, g);
  if (g->keep_loaded) return; /* reported in gen_shut */
  g->api->destroy(g->inst);
  rp_runtime_unbind(g->binding);
  /* Its last callback may still be returning through its code. */
  rp_runtime_quiesce(rt);
  dlclose(g->dl);
  close(g->fd);
  gen_free_names(g);
  free(g->path);
  free(g);
}

int rp_module_shut(rpcplugin_module *mod) {
  /* A swap under way finishes first (the runtime's drain may come from
   * another thread). */
  pthread_mutex_lock(&mod->mu);
  while (mod->swapping) pthread_cond_wait(&mod->cv, &mod->mu);
  pthread_mutex_unlock(&mod->mu);
  return gen_shut(mod->rt, mod->cur);
}

int rp_module_is_shut(const rpcplugin_module *mod) { return mod->cur->shut; }

int rp_module_has_file(rpcplugin_module *mod, dev_t dev, ino_t ino) {
  int found;
  pthread_mutex_lock(&mod->mu);
  found = (mod->cur && mod->cur->dev == dev && mod->cur->ino == ino) ||
          (mod->old && mod->old->dev == dev && mod->old->ino == ino);
  pthread_mutex_unlock(&mod->mu);
  return found;
}

void rp_module_free(rpcplugin_module *mod) {
  rp_gen *g = mod->cur;
  gen_shut(mod->rt, g);
  if (g->keep_loaded) return; /* reported in gen_shut; the handle stays */
  gen_free(mod->rt, g);
  pthread_cond_destroy(&mod->cv);
  pthread_mutex_destroy(&mod->mu);
  free(mod);
}

int rpcplugin_module_unload(rpcplugin_module *mod) {
  rpcplugin_host_api host;
  int rc;
  if (mod == NULL) return RPCPLUGIN_EINVAL;
  rp_runtime_fill_host_api(mod->cur->binding, &host);
  if (host.on_poller_thread(host.host_ctx)) return RPCPLUGIN_EWRONGTHREAD;
  rc = rp_module_shut(mod);
  if (rc != 0) return rc;
  rp_runtime_remove_module(mod->rt, mod);
  rp_module_free(mod);
  return 0;
}

/* ------------------------------------------------------------- swap */

static double ms_since(const struct timespec *t0) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - t0->tv_sec) * 1e3 +
         (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

/* 1 when both name the same services (in any order). */
static int same_services(const rp_gen *g, const rpcplugin_manifest *m) {
  size_t i, j, n = rpcplugin_manifest_service_count(m);
  if (n != g->nnames) return 0;
  for (i = 0; i < n; i++) {
    const char *s = rpcplugin_manifest_service_name(m, i);
    for (j = 0; j < g->nnames; j++)
      if (strcmp(g->names[j], s) == 0) break;
    if (j == g->nnames) return 0;
  }
  return 1;
}

static void names_list(const char *const *names, size_t n, char *buf,
                       size_t len) {
  size_t i, used = 0;
  buf[0] = '\0';
  for (i = 0; i < n && used + 2 < len; i++) {
    int k = snprintf(buf + used, len - used, "%s%s", i ? ", " : "", names[i]);
    if (k < 0) break;
    used += (size_t)k < len - used ? (size_t)k : len - used - 1;
  }
}

/* Move the old generation's open streams and queued output to the new one
 * (module API 1.2 handover), when both implement it. */
static int gen_handover(rpcplugin_runtime *rt, rp_gen *old, rp_gen *g) {
  rpcplugin_handover h;
  char msg[256];
  int rc;
  if (!RPCPLUGIN_MODULE_HAS(old->api, handover_out) ||
      !RPCPLUGIN_MODULE_HAS(old->api, handover_done) ||
      !RPCPLUGIN_MODULE_HAS(g->api, handover_in))
    return RPCPLUGIN_EUNSUPPORTED;
  memset(&h, 0, sizeof h);
  h.struct_size = sizeof h;
  rc = old->api->handover_out(old->inst, &h);
  if (rc != 0) return rc;
  msg[0] = '\0';
  rc = g->api->handover_in(g->inst, &h, msg, sizeof msg);
  if (rc != 0)
    rp_runtime_log(rt, RPCPLUGIN_LOG_ERROR,
                   "rpcplugin: swap: module %s did not take everything over: "
                   "%s",
                   g->path, msg[0] ? msg : rpcplugin_strerror(rc));
  old->api->handover_done(old->inst, &h);
  return rc;
}

int rpcplugin_module_swap(rpcplugin_module *mod, const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts,
                          rpcplugin_swap_info *info, rpcplugin_error *err) {
  rpcplugin_runtime *rt;
  rp_gen *old, *g;
  struct timespec t0, t1;
  rpcplugin_swap_info si;
  int rc;

  rp_error_clear(err);
  memset(&si, 0, sizeof si);
  if (mod == NULL || m == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "rpcplugin_module_swap: module and manifest needed");
  rt = mod->rt;
  if (rp_runtime_on_poller(rt))
    return rp_error(err, RPCPLUGIN_EWRONGTHREAD,
                    "rpcplugin_module_swap: not on a poller thread");
  if (rp_runtime_stopping(rt))
    return rp_error(err, RPCPLUGIN_ESHUTDOWN,
                    "%s: cannot swap: the plugin is shutting down",
                    rpcplugin_manifest_path(m));
  pthread_mutex_lock(&mod->mu);
  if (mod->swapping) {
    pthread_mutex_unlock(&mod->mu);
    return rp_error(err, RPCPLUGIN_ESTATE,
                    "%s: cannot swap: another swap of this module is under way",
                    rpcplugin_manifest_path(m));
  }
  mod->swapping = 1;
  old = mod->cur;
  pthread_mutex_unlock(&mod->mu);

  clock_gettime(CLOCK_MONOTONIC, &t0);
  if (rpcplugin_manifest_is_application(m) != mod->app ||
      rpcplugin_manifest_services(m) != mod->services ||
      !same_services(old, m)) {
    char was[512], now[512];
    const char **nn = calloc(rpcplugin_manifest_service_count(m) + 1,
                             sizeof *nn);
    size_t i;
    for (i = 0; nn && i < rpcplugin_manifest_service_count(m); i++)
      nn[i] = rpcplugin_manifest_service_name(m, i);
    names_list((const char *const *)old->names, old->nnames, was, sizeof was);
    names_list(nn, nn ? rpcplugin_manifest_service_count(m) : 0, now,
               sizeof now);
    free(nn);
    rc = rp_error(err, RPCPLUGIN_EMANIFEST,
                  "%s: cannot swap: it names other services than the module "
                  "serving now (serving: %s; manifest: %s); a swap keeps "
                  "the same services",
                  rpcplugin_manifest_path(m), was, now);
    goto out;
  }
  /* 1. The new implementation, loaded and started beside the old one; its
   * routes wait.  A failure here leaves the old one untouched. */
  rc = gen_load(rt, mod, m, opts, 1, &g, err);
  if (rc != 0) goto out;
  si.load_ms = ms_since(&t0);

  /* 2. The switch: new calls reach the new instance, host threads' entries
   * go to it, and the old one hands over its open streams. */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  pthread_mutex_lock(&mod->mu);
  mod->old = old;
  mod->cur = g;
  pthread_mutex_unlock(&mod->mu);
  rp_runtime_commit_routes(old->binding, g->binding);
  si.handover = gen_handover(rt, old, g);
  si.switch_ms = ms_since(&t1);

  /* 3. The old one retires: its application calls in flight finish (up to
   * MODULE_CALLS_WAIT_MS), then it shuts down (what it still holds ends as
   * at a shutdown), host threads still inside its entries leave (they are
   * answered RPCPLUGIN_ESHUTDOWN and go again to the new one), and it is
   * destroyed and dlclosed. */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  si.calls_left = rp_runtime_wait_calls(old->binding, MODULE_CALLS_WAIT_MS);
  gen_shut(rt, old);
  pthread_mutex_lock(&mod->mu);
  while (old->users > 0) pthread_cond_wait(&mod->cv, &mod->mu);
  pthread_mutex_unlock(&mod->mu);
  gen_free(rt, old);
  pthread_mutex_lock(&mod->mu);
  mod->old = NULL;
  mod->swaps++;
  pthread_mutex_unlock(&mod->mu);
  si.retire_ms = ms_since(&t1);
  si.total_ms = ms_since(&t0);
  rp_runtime_log(rt, RPCPLUGIN_LOG_DEBUG,
                 "rpcplugin: swapped %s for %s in %.3f ms (switch %.3f ms)",
                 old == g ? "?" : "the old module", g->path, si.total_ms,
                 si.switch_ms);
  rc = 0;
out:
  pthread_mutex_lock(&mod->mu);
  mod->swapping = 0;
  pthread_cond_broadcast(&mod->cv);
  pthread_mutex_unlock(&mod->mu);
  if (info && info->struct_size) {
    size_t n = info->struct_size < sizeof si ? info->struct_size : sizeof si;
    si.struct_size = info->struct_size;
    memcpy(info, &si, n);
  }
  return rc;
}

/* --------------------------------------------- entries through the handle */

/* The current generation, held: a swap does not retire it before
 * gen_leave. */
static rp_gen *gen_enter(rpcplugin_module *mod) {
  rp_gen *g;
  pthread_mutex_lock(&mod->mu);
  g = mod->cur;
  g->users++;
  pthread_mutex_unlock(&mod->mu);
  return g;
}

/* Returns 1 when a swap replaced g meanwhile (an RPCPLUGIN_ESHUTDOWN from
 * g then means "go again", not "the plugin stops"). */
static int gen_leave(rpcplugin_module *mod, rp_gen *g) {
  int moved;
  pthread_mutex_lock(&mod->mu);
  moved = mod->cur != g;
  if (--g->users == 0) pthread_cond_broadcast(&mod->cv);
  pthread_mutex_unlock(&mod->mu);
  return moved;
}

const rpcplugin_module_api *rpcplugin_module_api_of(
    const rpcplugin_module *mod) {
  return mod->cur->api;
}

void *rpcplugin_module_instance(const rpcplugin_module *mod) {
  return mod->cur->inst;
}

unsigned rpcplugin_module_services_of(const rpcplugin_module *mod) {
  return mod->services;
}

const char *rpcplugin_module_path(const rpcplugin_module *mod) {
  return mod->cur->path;
}

unsigned long rpcplugin_module_swaps(rpcplugin_module *mod) {
  unsigned long n;
  pthread_mutex_lock(&mod->mu);
  n = mod->swaps;
  pthread_mutex_unlock(&mod->mu);
  return n;
}

int rpcplugin_module_put_line(rpcplugin_module *mod, int channel,
                              const void *data, size_t len) {
  for (;;) {
    rp_gen *g = gen_enter(mod);
    int rc = RPCPLUGIN_MODULE_HAS(g->api, put_line)
                 ? g->api->put_line(g->inst, channel, data, len)
                 : RPCPLUGIN_EUNSUPPORTED;
    if (gen_leave(mod, g) && rc == RPCPLUGIN_ESHUTDOWN) continue;
    return rc;
  }
}

int rpcplugin_module_get_stats(rpcplugin_module *mod, rpcplugin_stats *out) {
  rp_gen *g = gen_enter(mod);
  int rc = RPCPLUGIN_MODULE_HAS(g->api, get_stats)
               ? g->api->get_stats(g->inst, out)
               : RPCPLUGIN_EUNSUPPORTED;
  gen_leave(mod, g);
  return rc;
}

int rpcplugin_module_broker_advertise(rpcplugin_module *mod,
                                      uint32_t service_id,
                                      const char *network,
                                      const char *address) {
  struct rp_mux *mx = rp_runtime_mux(mod->rt);
  if (mx != NULL) {
    /* Multiplexing: go-plugin's Accept makes a listener and sends no
     * ConnInfo; the client's knock routes its next stream here. */
    if ((rpcplugin_module_services_of(mod) & RPCPLUGIN_SVC_BROKER) == 0)
      return RPCPLUGIN_EUNSUPPORTED;
    return rp_mux_route(mx, service_id, network, address);
  }
  for (;;) {
    rp_gen *g = gen_enter(mod);
    int rc = RPCPLUGIN_MODULE_HAS(g->api, broker_advertise)
                 ? g->api->broker_advertise(g->inst, service_id, network,
                                            address)
                 : RPCPLUGIN_EUNSUPPORTED;
    if (gen_leave(mod, g) && rc == RPCPLUGIN_ESHUTDOWN) continue;
    return rc;
  }
}

/* Milliseconds left of timeout_ms since t0 (negative timeouts stay). */
static int time_left(int timeout_ms, const struct timespec *t0) {
  double left;
  if (timeout_ms < 0) return timeout_ms;
  left = (double)timeout_ms - ms_since(t0);
  return left > 0 ? (int)left : 0;
}

int rpcplugin_module_broker_wait_advertised(rpcplugin_module *mod,
                                            uint32_t service_id,
                                            int timeout_ms,
                                            rpcplugin_conn_info *out) {
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    rp_gen *g = gen_enter(mod);
    int rc = RPCPLUGIN_MODULE_HAS(g->api, broker_wait_advertised)
                 ? g->api->broker_wait_advertised(
                       g->inst, service_id, time_left(timeout_ms, &t0), out)
                 : RPCPLUGIN_EUNSUPPORTED;
    if (gen_leave(mod, g) && rc == RPCPLUGIN_ESHUTDOWN) continue;
    return rc;
  }
}

int rpcplugin_module_broker_knock(rpcplugin_module *mod, uint32_t service_id,
                                  const char *network, const char *address,
                                  int timeout_ms, char *err, size_t errlen) {
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    rp_gen *g = gen_enter(mod);
    int rc = RPCPLUGIN_MODULE_HAS(g->api, broker_knock)
                 ? g->api->broker_knock(g->inst, service_id, network, address,
                                        time_left(timeout_ms, &t0), err,
                                        errlen)
                 : RPCPLUGIN_EUNSUPPORTED;
    if (gen_leave(mod, g) && rc == RPCPLUGIN_ESHUTDOWN) continue;
    return rc;
  }
}
