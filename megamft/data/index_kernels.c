/* The training index's loops over every document of a data epoch, compiled (megamft/data/index_kernels.py).
 *
 * Plain C with no Python or numpy headers: called through ctypes on numpy arrays, so it builds with the
 * system's C compiler alone and releases the GIL while it runs. Each function computes exactly what its
 * Python reference in megamft/data/sequences.py and mixing.py computes (tested for equality).
 *
 * Types: task ids uint16, document indices int32 (megatron-core's document index is int32 too), sizes
 * (positions a document fills, 1..capacity) int32, offsets int64.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ shuffling */

/* numpy's Generator.shuffle of a 1-d array, draw for draw: Fisher-Yates from the last element down, each
 * j = random_interval(i) (the smallest all-ones mask >= i, 32-bit draws while i < 2^32, rejection above i)
 * from PCG64 (128-bit LCG, XSL-RR output; a 32-bit draw is the low half of a 64-bit one, its high half kept
 * for the next). Given the generator's state, the same permutation numpy gives (tested against numpy), but
 * the draws for the next AHEAD positions are made first and their elements prefetched: on arrays larger
 * than the caches most of numpy's time is the wait for x[j]. The generator's state after it is written
 * back. */

typedef unsigned __int128 u128;
typedef struct {
    u128 state, inc;
    int has_uint32;
    uint32_t uinteger;
} Pcg64;

static inline uint64_t pcg64_next64(Pcg64 *g) {
    const u128 multiplier = ((u128)2549297995355413924ULL << 64) | 4865540595714422341ULL;
    g->state = g->state * multiplier + g->inc;
    uint64_t folded = (uint64_t)(g->state >> 64) ^ (uint64_t)g->state;
    unsigned rot = (unsigned)(g->state >> 122);
    return (folded >> rot) | (folded << ((-rot) & 63));
}

static inline uint32_t pcg64_next32(Pcg64 *g) {
    if (g->has_uint32) {
        g->has_uint32 = 0;
        return g->uinteger;
    }
    uint64_t next = pcg64_next64(g);
    g->has_uint32 = 1;
    g->uinteger = (uint32_t)(next >> 32);
    return (uint32_t)(next & 0xffffffffULL);
}

static inline uint64_t random_interval(Pcg64 *g, uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max, value;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    if (max <= 0xffffffffULL) {
        while ((value = (pcg64_next32(g) & mask)) > max) {
        }
    } else {
        while ((value = (pcg64_next64(g) & mask)) > max) {
        }
    }
    return value;
}

#define AHEAD 16

#define SHUFFLE(NAME, TYPE)                                                                     \
    static void NAME(TYPE *x, int64_t n, Pcg64 *g) {                                           \
        int64_t js[AHEAD];                                                                     \
        for (int64_t k = 0; k < AHEAD && n - 1 - k >= 1; k++) {                                \
            js[k] = (int64_t)random_interval(g, (uint64_t)(n - 1 - k));                        \
            __builtin_prefetch(&x[js[k]]);                                                     \
        }                                                                                      \
        int head = 0;                                                                          \
        for (int64_t i = n - 1; i >= 1; i--) {                                                 \
            int64_t j = js[head];                                                              \
            if (i - AHEAD >= 1) {                                                              \
                js[head] = (int64_t)random_interval(g, (uint64_t)(i - AHEAD));                 \
                __builtin_prefetch(&x[js[head]]);                                              \
            }                                                                                  \
            head = (head + 1) % AHEAD;                                                         \
            TYPE t = x[j];                                                                     \
            x[j] = x[i];                                                                       \
            x[i] = t;                                                                          \
        }                                                                                      \
    }

SHUFFLE(shuffle2, uint16_t)
SHUFFLE(shuffle4, uint32_t)
SHUFFLE(shuffle8, uint64_t)

/* state: [state high, state low, inc high, inc low, has_uint32, uinteger], updated in place. Returns 0,
 * -1 for an item size other than 2, 4 or 8 bytes. */
int64_t megamft_shuffle(void *x, int64_t n, int64_t itemsize, uint64_t *state) {
    Pcg64 g = {((u128)state[0] << 64) | state[1], ((u128)state[2] << 64) | state[3], (int)state[4],
               (uint32_t)state[5]};
    if (itemsize == 2) shuffle2((uint16_t *)x, n, &g);
    else if (itemsize == 4) shuffle4((uint32_t *)x, n, &g);
    else if (itemsize == 8) shuffle8((uint64_t *)x, n, &g);
    else return -1;
    state[0] = (uint64_t)(g.state >> 64);
    state[1] = (uint64_t)g.state;
    state[2] = (uint64_t)(g.inc >> 64);
    state[3] = (uint64_t)g.inc;
    state[4] = (uint64_t)g.has_uint32;
    state[5] = g.uinteger;
    return 0;
}

/* ------------------------------------------------------------------ task interleaving */

/* The documents of one data epoch in order: the k-th occurrence of task t takes streams[starts[t] + k].
 * Writes the kept documents (those filling at least one position) with their sizes, clip(length - 1, 0,
 * seq_length), and returns how many were kept; -1 if a stream is too short. */
int64_t megamft_interleave(const uint16_t *tasks, int64_t n, int32_t num_tasks, const int32_t *streams,
                           const int64_t *starts, const int64_t *stops, const int32_t *const *lengths,
                           int32_t seq_length, uint16_t *tasks_out, int32_t *docs_out, int32_t *sizes_out) {
    int64_t *next = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_tasks > 0 ? num_tasks : 1));
    if (next == NULL) return -2;
    memcpy(next, starts, sizeof(int64_t) * (size_t)num_tasks);
    for (int64_t i = 0; i < n; i++) {  /* the documents, in order */
        uint16_t task = tasks[i];
        if (task >= num_tasks || next[task] >= stops[task]) {
            free(next);
            return -1;
        }
        docs_out[i] = streams[next[task]++];
    }
    free(next);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {  /* their sizes: random reads of the lengths, prefetched ahead */
        if (i + AHEAD < n) __builtin_prefetch(&lengths[tasks[i + AHEAD]][docs_out[i + AHEAD]]);
        uint16_t task = tasks[i];
        int32_t doc = docs_out[i];
        int32_t size = lengths[task][doc] - 1;
        if (size > seq_length) size = seq_length;
        if (size <= 0) continue;
        tasks_out[kept] = task;
        docs_out[kept] = doc;
        sizes_out[kept] = size;
        kept++;
    }
    return kept;
}

/* ------------------------------------------------------------------ next-fit (concat) */

/* Items in order; a new bin starts whenever the next item does not fit. offsets: n + 1 slots; returns the
 * number of bins (offsets[0..bins] filled). */
int64_t megamft_next_fit(const int32_t *sizes, int64_t n, int32_t capacity, int64_t *offsets) {
    int64_t bins = 0, used = 0;
    offsets[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i > offsets[bins] && used + sizes[i] > capacity) {
            offsets[++bins] = i;
            used = 0;
        }
        used += sizes[i];
    }
    if (n > 0) offsets[++bins] = n;
    return bins;
}

/* ------------------------------------------------------------------ best-fit (pack) */

/* Open bins by free space: a bitmap of the spaces that have open bins (two levels, so the next space at
 * or above a size is found in a few word scans), and per space a binary min-heap of bin ids (equal
 * spaces: the oldest bin first, as the reference's sorted (space, id) list gives). */
typedef struct {
    int32_t *ids;
    int32_t size, cap;
} Heap;

typedef struct {
    int32_t capacity;
    int64_t words;
    uint64_t *bits, *summary;
    Heap *heaps;
} OpenBins;

static int open_bins_init(OpenBins *b, int32_t capacity) {
    b->capacity = capacity;
    b->words = ((int64_t)capacity + 1 + 63) / 64;
    b->bits = (uint64_t *)calloc((size_t)b->words, sizeof(uint64_t));
    b->summary = (uint64_t *)calloc((size_t)((b->words + 63) / 64), sizeof(uint64_t));
    b->heaps = (Heap *)calloc((size_t)capacity + 1, sizeof(Heap));
    return b->bits && b->summary && b->heaps;
}

static void open_bins_free(OpenBins *b) {
    if (b->heaps)
        for (int64_t s = 0; s <= b->capacity; s++) free(b->heaps[s].ids);
    free(b->bits);
    free(b->summary);
    free(b->heaps);
}

/* The smallest space >= from that holds an open bin, or -1. */
static int64_t next_space(const OpenBins *b, int64_t from) {
    if (from > b->capacity) return -1;
    int64_t w = from >> 6;
    uint64_t word = b->bits[w] & (~0ULL << (from & 63));
    if (word) return (w << 6) + __builtin_ctzll(word);
    int64_t sw = (w + 1) >> 6, nsum = (b->words + 63) / 64;
    if (((w + 1) & 63) != 0 && sw < nsum) {
        uint64_t s = b->summary[sw] & (~0ULL << ((w + 1) & 63));
        if (s) {
            int64_t hit = (sw << 6) + __builtin_ctzll(s);
            return (hit << 6) + __builtin_ctzll(b->bits[hit]);
        }
        sw++;
    }
    for (; sw < nsum; sw++)
        if (b->summary[sw]) {
            int64_t hit = (sw << 6) + __builtin_ctzll(b->summary[sw]);
            return (hit << 6) + __builtin_ctzll(b->bits[hit]);
        }
    return -1;
}

static int push(OpenBins *b, int32_t space, int32_t id) {
    Heap *h = &b->heaps[space];
    if (h->size == h->cap) {
        int32_t cap = h->cap ? 2 * h->cap : 4;
        int32_t *ids = (int32_t *)realloc(h->ids, sizeof(int32_t) * (size_t)cap);
        if (ids == NULL) return 0;
        h->ids = ids;
        h->cap = cap;
    }
    int32_t i = h->size++;
    while (i > 0 && h->ids[(i - 1) / 2] > id) {
        h->ids[i] = h->ids[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->ids[i] = id;
    if (h->size == 1) {
        b->bits[space >> 6] |= 1ULL << (space & 63);
        b->summary[space >> 12] |= 1ULL << ((space >> 6) & 63);
    }
    return 1;
}

static int32_t pop(OpenBins *b, int32_t space) {
    Heap *h = &b->heaps[space];
    int32_t top = h->ids[0], last = h->ids[--h->size], i = 0;
    for (;;) {
        int32_t child = 2 * i + 1;
        if (child >= h->size) break;
        if (child + 1 < h->size && h->ids[child + 1] < h->ids[child]) child++;
        if (h->ids[child] >= last) break;
        h->ids[i] = h->ids[child];
        i = child;
    }
    if (h->size > 0) h->ids[i] = last;
    if (h->size == 0) {
        b->bits[space >> 6] &= ~(1ULL << (space & 63));
        if (b->bits[space >> 6] == 0) b->summary[space >> 12] &= ~(1ULL << ((space >> 6) & 63));
    }
    return top;
}

/* Stable sort of items[0..m) by descending size (LSD radix on capacity - size, 8 bits a pass). */
static void sort_descending(const int32_t *sizes, int32_t capacity, int32_t *items, int32_t *scratch, int64_t m) {
    int64_t count[257];
    for (int shift = 0; (capacity >> shift) > 0; shift += 8) {
        memset(count, 0, sizeof(count));
        for (int64_t i = 0; i < m; i++) count[((capacity - sizes[items[i]]) >> shift & 255) + 1]++;
        for (int k = 0; k < 256; k++) count[k + 1] += count[k];
        for (int64_t i = 0; i < m; i++) scratch[count[(capacity - sizes[items[i]]) >> shift & 255]++] = items[i];
        memcpy(items, scratch, sizeof(int32_t) * (size_t)m);
    }
}

/* Best-fit decreasing per window of `window` items, open bins carried over (sequences.best_fit_groups).
 * Writes each item's bin (item_bin), the items in the order they were placed (order: each window sorted by
 * descending size, stable), and the bins in the order they close (emit). A window's end closes the open
 * bins no item of it would fit, in (space, id) order: segments[2k], segments[2k + 1] give the start and
 * count of the k-th such run in emit, which the caller shuffles. Returns the number of bins, -1 when out of
 * memory. */
int64_t megamft_best_fit(const int32_t *sizes, int64_t n, int32_t capacity, int64_t window, int32_t *item_bin,
                         int32_t *order, int32_t *emit, int64_t *segments, int64_t *num_segments) {
    OpenBins bins;
    int32_t *scratch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(window < n ? window : (n > 0 ? n : 1)));
    if (!open_bins_init(&bins, capacity) || scratch == NULL) {
        open_bins_free(&bins);
        free(scratch);
        return -1;
    }
    int64_t emitted = 0, segs = 0;
    int32_t next_id = 0;
    for (int64_t start = 0; start < n; start += window) {
        int64_t m = n - start < window ? n - start : window;
        int32_t *items = order + start;
        for (int64_t i = 0; i < m; i++) items[i] = (int32_t)(start + i);
        sort_descending(sizes, capacity, items, scratch, m);
        for (int64_t i = 0; i < m; i++) {
            int32_t item = items[i], size = sizes[item], bin, space;
            int64_t found = next_space(&bins, size);
            if (found >= 0) {
                space = (int32_t)found;
                bin = pop(&bins, space);
            } else {
                space = capacity;
                bin = next_id++;
            }
            item_bin[item] = bin;
            if (space - size > 0) {
                if (!push(&bins, space - size, bin)) goto oom;
            } else {
                emit[emitted++] = bin;
            }
        }
        int32_t smallest = sizes[items[m - 1]];
        segments[2 * segs] = emitted;
        for (int64_t s = next_space(&bins, 1); s >= 0 && s < smallest; s = next_space(&bins, s + 1))
            while (bins.heaps[s].size > 0) emit[emitted++] = pop(&bins, (int32_t)s);
        segments[2 * segs + 1] = emitted - segments[2 * segs];
        segs++;
    }
    for (int64_t s = next_space(&bins, 1); s >= 0; s = next_space(&bins, s + 1))
        while (bins.heaps[s].size > 0) emit[emitted++] = pop(&bins, (int32_t)s);
    open_bins_free(&bins);
    free(scratch);
    *num_segments = segs;
    return next_id;
oom:
    open_bins_free(&bins);
    free(scratch);
    return -1;
}

/* The items of each bin, bins in the order of emit, each bin's items in the order they were placed:
 * flat[offsets[r]:offsets[r + 1]] are the items of bin emit[r]. Returns 0, -1 when out of memory. */
int64_t megamft_group_items(const int32_t *item_bin, const int32_t *order, int64_t n, const int32_t *emit,
                            int64_t num_bins, int32_t *flat, int64_t *offsets) {
    int32_t *rank = (int32_t *)malloc(sizeof(int32_t) * (size_t)(num_bins > 0 ? num_bins : 1));
    int64_t *cursor = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_bins > 0 ? num_bins : 1));
    if (rank == NULL || cursor == NULL) {
        free(rank);
        free(cursor);
        return -1;
    }
    for (int64_t r = 0; r < num_bins; r++) rank[emit[r]] = (int32_t)r;
    memset(offsets, 0, sizeof(int64_t) * (size_t)(num_bins + 1));
    for (int64_t i = 0; i < n; i++) offsets[rank[item_bin[i]] + 1]++;
    for (int64_t r = 0; r < num_bins; r++) offsets[r + 1] += offsets[r];
    memcpy(cursor, offsets, sizeof(int64_t) * (size_t)num_bins);
    for (int64_t i = 0; i < n; i++) {
        int32_t item = order[i];
        flat[cursor[rank[item_bin[item]]]++] = item;
    }
    free(rank);
    free(cursor);
    return 0;
}
