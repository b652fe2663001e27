/*
 * worker.h - one worker thread and a queue of jobs, for the examples:
 * handlers run on the host's poller threads and must not block, so work
 * that waits (file I/O, a call back to the client) goes here, and the job
 * answers its call when it is done.  Header-only; each example includes it
 * once.
 */
#ifndef RP_EXAMPLE_WORKER_H
#define RP_EXAMPLE_WORKER_H

#include <pthread.h>
#include <stdlib.h>

typedef struct ex_job {
  void (*run)(struct ex_job *job); /* does the work, answers, frees job */
  struct ex_job *next;
} ex_job;

typedef struct ex_worker {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  ex_job *head, **tail;
  int stopping;
} ex_worker;

static void *ex_worker_main(void *arg) {
  ex_worker *w = arg;
  for (;;) {
    ex_job *j;
    pthread_mutex_lock(&w->mu);
    while (w->head == NULL && !w->stopping) pthread_cond_wait(&w->cv, &w->mu);
    j = w->head;
    if (j && (w->head = j->next) == NULL) w->tail = &w->head;
    pthread_mutex_unlock(&w->mu);
    if (j == NULL) return NULL; /* stopping, and nothing left to do */
    j->run(j);
  }
}

static int ex_worker_start(ex_worker *w) {
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  w->head = NULL;
  w->tail = &w->head;
  w->stopping = 0;
  return pthread_create(&w->thread, NULL, ex_worker_main, w) == 0 ? 0 : -1;
}

static void ex_worker_submit(ex_worker *w, ex_job *j) {
  j->next = NULL;
  pthread_mutex_lock(&w->mu);
  *w->tail = j;
  w->tail = &j->next;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

/* Run what is queued, then stop and join. */
static void ex_worker_stop(ex_worker *w) {
  pthread_mutex_lock(&w->mu);
  w->stopping = 1;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
  pthread_join(w->thread, NULL);
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
}

#endif
