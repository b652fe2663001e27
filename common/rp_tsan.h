/*
 * rp_tsan.h - happens-before through gRPC's completion queue, told to
 * ThreadSanitizer.
 *
 * Debian's gRPC is not instrumented: TSan does not see the synchronisation
 * inside it.  A thread that fills a tag's state and starts a batch, and the
 * poller thread that later gets the tag back from grpc_completion_queue_next
 * and reads that state, look unsynchronised to it, although the queue
 * orders them.  RP_TSAN_RELEASE(tag) right before a tag is handed to gRPC
 * and RP_TSAN_ACQUIRE(tag) right after the queue hands it back state that
 * order exactly, and nothing more.  No-ops in other builds.
 */
#ifndef RP_TSAN_H
#define RP_TSAN_H

#if defined(__SANITIZE_THREAD__)
#define RP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RP_TSAN 1
#endif
#endif

#ifdef RP_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define RP_TSAN_RELEASE(tag) __tsan_release((void *)(tag))
#define RP_TSAN_ACQUIRE(tag) __tsan_acquire((void *)(tag))
#else
#define RP_TSAN_RELEASE(tag) ((void)0)
#define RP_TSAN_ACQUIRE(tag) ((void)0)
#endif

#endif
