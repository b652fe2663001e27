/*
 * rp_trim.h - give memory back after a flood of streams.
 *
 * A client that opens hundreds of streams and leaves makes gRPC and the
 * module allocate, then free, tens of MiB; glibc keeps what was freed in
 * its arenas, so the process stays that large (issue 11: 108-136 MiB held
 * 3 s after a flood, baseline 12.5 MiB).  A service notes its open streams
 * at each open and close; once a peak of RP_TRIM_PEAK or more fell back to
 * at most one stream (go-plugin's client keeps one), malloc_trim(0) returns
 * the free pages to the kernel.  It runs rarely (once per flood), outside
 * every lock, on the poller thread that saw the last close.
 */
#ifndef RP_TRIM_H
#define RP_TRIM_H

#include <malloc.h>
#include <stddef.h>

#define RP_TRIM_PEAK 64

typedef struct rp_trim {
  size_t peak; /* most streams open since the last trim */
} rp_trim;

/* Under the service's lock, after the count changed; returns 1 when the
 * caller should call rp_trim_now() once it released the lock. */
static inline int rp_trim_note(rp_trim *t, size_t open) {
  if (open > t->peak) t->peak = open;
  if (open <= 1 && t->peak >= RP_TRIM_PEAK) {
    t->peak = open;
    return 1;
  }
  return 0;
}

static inline void rp_trim_now(void) { (void)malloc_trim(0); }

#endif
