/* Whether a copy for peers streams, chosen per size class by timing both ways (runtime/stream_choice.py).

Streaming stores (stream_store.h) help on one machine and hurt on the next: 2 ranks on an AMD EPYC VM,
a 64 KiB all_reduce 14 us streamed against 22 plain; on an Intel Xeon VM 25 against 14.5; and the AMD VM
switched between the two for seconds at a time. So each channel times its own operations both ways:
the first PROBE_CALLS calls of a size class (an operation kind and a power of two of bytes) alternate
plain and streamed, and every `period` calls of that class it does so again; in between it uses the
way whose median time was lower. Every member of a channel runs the same operations in the same
order, so their probes fall on the same calls: each member's time covers its reads of what its peers
wrote the same way, and the members choose alike without a word between them (a choice
changes no value, only speed, so members that chose differently still agree bitwise).

The state is an array of 64-bit words owned by the channel (the layout below); one operation at a
time uses it (the channel's lock). */
#ifndef RINGPIPE_STREAM_CHOICE_H
#define RINGPIPE_STREAM_CHOICE_H

#include <stdint.h>

enum {
    SC_PERIOD,   /* calls of a class from one probe to the next; <= 0: no probes (the size rule) */
    SC_CLASS,    /* the current call's class while it is a probe, else -1 */
    SC_SLOT,     /* its sample's word in that class */
    SC_STARTED,  /* when it chose (ns) */
    SC_CLASSES_AT = 8,
};
enum { SC_SIZES = 48, SC_KINDS = 3, SC_SAMPLES = 5, PROBE_CALLS = 2 * SC_SAMPLES };
/* Per class: calls so far, the verdict, then SC_SAMPLES times plain and SC_SAMPLES streamed. */
enum { SC_CALLS, SC_VERDICT, SC_PLAIN, SC_STREAMED = SC_PLAIN + SC_SAMPLES, SC_PER_CLASS = SC_STREAMED + SC_SAMPLES };
enum { SC_WORDS = SC_CLASSES_AT + SC_KINDS * SC_SIZES * SC_PER_CLASS };
/* Operation kinds: a one-round reduction, an all_reduce's reduce-scatter + all-gather rounds, a copy
   that every member writes and reads (all_gather). */
enum { SC_KIND_REDUCE, SC_KIND_HALVES, SC_KIND_COPY };
enum { SC_UNDECIDED, SC_PLAIN_WINS, SC_STREAM_WINS };

/* The threshold this call streams from (stream_min or 0): `size_rule` (the threshold without probes)
   where `state` is NULL, probes are off, or the class has no verdict yet and this call is not a
   probe; nothing streams below stream_min. */
int64_t rp_stream_choose(int64_t *state, int64_t kind, int64_t bytes, int64_t stream_min, int64_t size_rule);

/* The choice `kind` and `bytes` have now, without counting a call (an operation whose time this
   member cannot see, such as a broadcast's root: it follows the class of copies every member reads). */
int64_t rp_stream_follow(int64_t *state, int64_t kind, int64_t bytes, int64_t stream_min, int64_t size_rule);

/* The call that chose last is done: when it was a probe, its time since choosing, less `excluded_ns`
   (waits for members to arrive, which the choice does not change), is its sample; the last probe
   of a round of probes sets the verdict. */
void rp_stream_record(int64_t *state, int64_t excluded_ns);

#endif
