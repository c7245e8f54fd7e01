/* stream_store.h's fenced copy as a library function, for the Python paths of the same-host
collectives (runtime/stream_store.py, through ctypes, GIL released). */
#include <stddef.h>

#include "stream_store.h"

void rp_stream_copy_fenced(void *dst, const void *src, size_t bytes) { rp_stream_copy(dst, src, bytes); }
