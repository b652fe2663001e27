/*
 * monotime.h - CLOCK_MONOTONIC milliseconds and deadlines for pthread timed waits,
 * shared by the module and the host (wall-clock changes never shorten or
 * stretch a wait).
 */
#ifndef RPCPLUGIN_MONOTIME_H
#define RPCPLUGIN_MONOTIME_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

/* Milliseconds on CLOCK_MONOTONIC (for elapsed times and deadlines). */
static inline int64_t rp_mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* *ts = now + ms on CLOCK_MONOTONIC. */
static inline void rp_deadline_after_ms(struct timespec *ts, long ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += ms / 1000;
  ts->tv_nsec += (ms % 1000) * 1000000L;
  if (ts->tv_nsec >= 1000000000L) {
    ts->tv_sec++;
    ts->tv_nsec -= 1000000000L;
  }
}

/* A condition variable whose timed waits take CLOCK_MONOTONIC deadlines. */
static inline void rp_cond_init_monotonic(pthread_cond_t *cv) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(cv, &ca);
  pthread_condattr_destroy(&ca);
}

#endif
