/* Stores into the shared buffers that another process reads next (runtime/shm_channel.py's buffers),
for every C helper that writes them: streaming (non-temporal) stores above a size the caller gives.

Why: a line that this core just wrote sits modified in its own cache, and a peer on another core
that reads it makes the coherence protocol fetch it from there, line by line. On the 2-core VM this
project measures on that ran at ~3 GB/s, against ~6 GB/s when the writer streams its lines to memory
and the reader fetches them from there (2 ranks, all_reduce round, plain C probe: 1 MiB 370 -> 190 us,
64 KiB 25 -> 12 us; 1 KiB equal, the fence's cost). Where the caches are shared (one socket with one
L3, bare metal) a plain store can win: the threshold is the caller's (runtime/shm_channel.py's
stream_min_bytes, RINGPIPE_SHM_STREAM_MIN), and 0 turns streaming off.

rp_stream_copy: dst <- src, `bytes` bytes, then a fence, so the stores are visible before the publish
that follows (a release store alone does not order non-temporal stores). rp_stream_copy_unfenced and
rp_stream_fence for a caller that streams several pieces before one publish. Where the CPU has no
streaming stores this helper knows (not x86-64), both are plain memcpy. */
#ifndef RINGPIPE_STREAM_STORE_H
#define RINGPIPE_STREAM_STORE_H

#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>

static inline void rp_stream_copy_unfenced(void *dst, const void *src, size_t bytes) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15; /* a streaming store takes a 16-byte aligned address */
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    d += head, s += head, bytes -= head;
    size_t body = bytes & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i)), b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32)), e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + body, s + body, bytes - body);
}

static inline void rp_stream_fence(void) { _mm_sfence(); }
#else
static inline void rp_stream_copy_unfenced(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static inline void rp_stream_fence(void) {}
#endif

static inline void rp_stream_copy(void *dst, const void *src, size_t bytes) {
    rp_stream_copy_unfenced(dst, src, bytes);
    rp_stream_fence();
}

/* dst <- src: streamed when `bytes` >= stream_min > 0, else memcpy (fenced either way as needed). */
static inline void rp_copy_for_peers(void *dst, const void *src, size_t bytes, int64_t stream_min) {
    if (stream_min > 0 && (int64_t)bytes >= stream_min) rp_stream_copy(dst, src, bytes);
    else memcpy(dst, src, bytes);
}

#endif
