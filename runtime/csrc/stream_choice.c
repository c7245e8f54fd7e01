/* stream_choice.h's functions, for the latency path's extension and, through ctypes, the Python chunk
loop (runtime/shm_reduce_chunks.py). */
#include "stream_choice.h"

#include "monotonic_clock.h"

static int64_t *class_at(int64_t *state, int64_t kind, int64_t bytes) {
    int64_t size = 0;
    while (size < SC_SIZES - 1 && (bytes >> (size + 1)) > 0) size++; /* floor(log2(bytes)) */
    return state + SC_CLASSES_AT + (kind * SC_SIZES + size) * SC_PER_CLASS;
}

static int usable(const int64_t *state, int64_t kind, int64_t bytes, int64_t stream_min) {
    return state && state[SC_PERIOD] > 0 && kind >= 0 && kind < SC_KINDS && stream_min > 0 && bytes >= stream_min;
}

static int64_t by_verdict(const int64_t *c, int64_t stream_min, int64_t size_rule) {
    if (c[SC_VERDICT] == SC_STREAM_WINS) return stream_min;
    return c[SC_VERDICT] == SC_PLAIN_WINS ? 0 : size_rule;
}

int64_t rp_stream_choose(int64_t *state, int64_t kind, int64_t bytes, int64_t stream_min, int64_t size_rule) {
    if (state) state[SC_CLASS] = -1;
    if (!usable(state, kind, bytes, stream_min)) return size_rule;
    int64_t *c = class_at(state, kind, bytes);
    int64_t k = c[SC_CALLS] % state[SC_PERIOD];
    c[SC_CALLS] += 1;
    if (k >= PROBE_CALLS) return by_verdict(c, stream_min, size_rule);
    if (k == 0)
        for (int i = 0; i < 2 * SC_SAMPLES; i++) c[SC_PLAIN + i] = 0; /* (0: no sample, a wait went to Python) */
    int streamed = (int)(k & 1); /* alternating: a slow phase of the machine touches both ways alike */
    state[SC_CLASS] = (c - state - SC_CLASSES_AT) / SC_PER_CLASS;
    state[SC_SLOT] = (streamed ? SC_STREAMED : SC_PLAIN) + k / 2;
    state[SC_STARTED] = now_ns();
    return streamed ? stream_min : 0;
}

int64_t rp_stream_follow(int64_t *state, int64_t kind, int64_t bytes, int64_t stream_min, int64_t size_rule) {
    if (state) state[SC_CLASS] = -1; /* (nothing to record) */
    if (!usable(state, kind, bytes, stream_min)) return size_rule;
    return by_verdict(class_at(state, kind, bytes), stream_min, size_rule);
}

/* The median of the samples taken (0: none). */
static int64_t median(const int64_t *samples) {
    int64_t taken[SC_SAMPLES];
    int n = 0;
    for (int i = 0; i < SC_SAMPLES; i++) {
        if (samples[i] <= 0) continue;
        int j = n++;
        for (; j > 0 && taken[j - 1] > samples[i]; j--) taken[j] = taken[j - 1];
        taken[j] = samples[i];
    }
    return n ? taken[n / 2] : 0;
}

void rp_stream_record(int64_t *state, int64_t excluded_ns) {
    if (!state || state[SC_CLASS] < 0) return;
    int64_t *c = state + SC_CLASSES_AT + state[SC_CLASS] * SC_PER_CLASS;
    int64_t took = now_ns() - state[SC_STARTED] - excluded_ns;
    c[state[SC_SLOT]] = took > 0 ? took : 1;
    state[SC_CLASS] = -1;
    if (state[SC_SLOT] != SC_STREAMED + SC_SAMPLES - 1) return; /* (the round's last probe: streamed, 5th) */
    int64_t plain = median(c + SC_PLAIN), streamed = median(c + SC_STREAMED);
    if (plain && streamed) c[SC_VERDICT] = streamed < plain ? SC_STREAM_WINS : SC_PLAIN_WINS;
}
