/*
 * The merge's hot loop on CPU: docs/method.md's counter-based mask bits and a merge form, fused into one pass over a
 * chunk, with the GIL released so chunks run in parallel threads. Values are float32, bfloat16 or float16 in memory
 * (read and written here directly, so no conversion pass runs per chunk) and computed in float32.
 *
 * Every float operation is the one darwin/merge/methods.py performs with torch, in the same order and in float32 (built
 * with -ffp-contract=off so no multiply-add is fused), and bf16 is stored with torch's round-to-nearest-even, so
 * this path and the torch path (CUDA) give the same bytes (a NaN's bits aside); tests/test_merge.py holds them to that.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One build runs everywhere yet uses the widest vectors the CPU has (AVX-512 multiplies 64-bit lanes natively): the
 * loader picks a clone at start-up. Baseline x86-64 ran splitmix one element at a time, 9x slower. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

static inline uint64_t splitmix(uint64_t seed, uint64_t index) {
    uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

static inline float from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float load_f32(const void *p, Py_ssize_t i) { return ((const float *)p)[i]; }
static inline void store_f32(void *p, Py_ssize_t i, float v) { ((float *)p)[i] = v; }

static inline float load_bf16(const void *p, Py_ssize_t i) { return from_bits((uint32_t)((const uint16_t *)p)[i] << 16); }

/* c10::BFloat16's round to nearest even, as torch's .to(torch.bfloat16); a NaN stays a NaN (0x7FC0 here; torch's own
 * bits for it differ between its vector and scalar paths) */
static inline void store_bf16(void *p, Py_ssize_t i, float v) {
    uint32_t bits = to_bits(v);
    ((uint16_t *)p)[i] = (v != v) ? (uint16_t)0x7FC0 : (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* c10::Half's fp16_ieee_to_fp32_value: exact, subnormals included */
static inline float load_f16(const void *p, Py_ssize_t i) {
    uint32_t w = (uint32_t)((const uint16_t *)p)[i] << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | to_bits(two_w < (1u << 27) ? denormalized : normalized));
}

/* c10::Half's fp16_ieee_from_fp32_value: round to nearest even, overflow to inf, NaN to sign | 0x7E00, as torch's
 * .to(torch.float16) (whose vector path, F16C's vcvtps2ph, gives the same bits for every float it meets here) */
static inline void store_f16(void *p, Py_ssize_t i, float v) {
    float base = (fabsf(v) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = to_bits(v), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    uint32_t bits = to_bits(from_bits((bias >> 1) + 0x07800000u) + base);
    uint16_t nonsign = (uint16_t)(((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu));
    ((uint16_t *)p)[i] = (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* The V6 blend, w * form + (1 - w) * (a + (b - a) * r), as darwin.merge.methods.torch_merge writes it: `rest` is
 * 1 - w rounded once */
static inline float blended(float form, float a, float b, float r, float w, float rest) {
    return form * w + (a + (b - a) * r) * rest;
}

/* BLEND is a constant in each loop, so the unblended loops (w = 1) do no extra work */
#define DEFINE_LOOPS(NAME, LOAD, STORE, BLEND)                                                                    \
    SIMD_CLONES                                                                                                   \
    static void darwin_loop_##NAME(void *out, const void *a, const void *b, Py_ssize_t n, uint64_t start,         \
                                   uint64_t seed, uint32_t threshold_b, float r, float w, float rest) {           \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                      \
            uint64_t z = splitmix(seed, start + (uint64_t)i);                                                     \
            int keep_b = (uint32_t)(z >> 40) < threshold_b;                                                       \
            float x = LOAD(a, i), y = LOAD(b, i);                                                                 \
            float form = x + (keep_b ? (y - x) * r : 0.0f);                                                       \
            STORE(out, i, BLEND ? blended(form, x, y, r, w, rest) : form);                                        \
        }                                                                                                         \
    }                                                                                                             \
    SIMD_CLONES                                                                                                   \
    static void dare_loop_##NAME(void *out, const void *a, const void *b, const void *c, Py_ssize_t n,            \
                                 uint64_t start, uint64_t seed, uint32_t threshold_a, uint32_t threshold_b,       \
                                 float scale_a, float scale_b, int use_a, int use_b, float r, float w,            \
                                 float rest) {                                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                      \
            uint64_t z = splitmix(seed, start + (uint64_t)i);                                                     \
            int keep_b = ((uint32_t)(z >> 40) < threshold_b) & use_b;                                             \
            int keep_a = ((uint32_t)((z >> 16) & 0xFFFFFFu) < threshold_a) & use_a;                              \
            float base = LOAD(c, i), x = LOAD(a, i), y = LOAD(b, i);                                              \
            float delta_a = keep_a ? (x - base) * scale_a : 0.0f;                                                 \
            float delta_b = keep_b ? (y - base) * scale_b : 0.0f;                                                 \
            float elected = (delta_a + delta_b >= 0.0f) ? 1.0f : -1.0f;                                           \
            float form = base + ((sign_of(delta_a) == elected ? delta_a : 0.0f) +                                 \
                                 (sign_of(delta_b) == elected ? delta_b : 0.0f));                                 \
            STORE(out, i, BLEND ? blended(form, x, y, r, w, rest) : form);                                        \
        }                                                                                                         \
    }

DEFINE_LOOPS(f32, load_f32, store_f32, 0)
DEFINE_LOOPS(bf16, load_bf16, store_bf16, 0)
DEFINE_LOOPS(f16, load_f16, store_f16, 0)
DEFINE_LOOPS(f32_blend, load_f32, store_f32, 1)
DEFINE_LOOPS(bf16_blend, load_bf16, store_bf16, 1)
DEFINE_LOOPS(f16_blend, load_f16, store_f16, 1)

/* The loops by dtype code (0: float32, 1: bfloat16, 2: float16) and blend; a value's size in bytes */
typedef void (*darwin_loop)(void *, const void *, const void *, Py_ssize_t, uint64_t, uint64_t, uint32_t, float, float,
                            float);
typedef void (*dare_loop)(void *, const void *, const void *, const void *, Py_ssize_t, uint64_t, uint64_t, uint32_t,
                          uint32_t, float, float, int, int, float, float, float);
static const darwin_loop DARWIN_LOOPS[2][3] = {{darwin_loop_f32, darwin_loop_bf16, darwin_loop_f16},
                                               {darwin_loop_f32_blend, darwin_loop_bf16_blend, darwin_loop_f16_blend}};
static const dare_loop DARE_LOOPS[2][3] = {{dare_loop_f32, dare_loop_bf16, dare_loop_f16},
                                           {dare_loop_f32_blend, dare_loop_bf16_blend, dare_loop_f16_blend}};
static const Py_ssize_t SIZES[3] = {4, 2, 2};

/* Every buffer holds the same number of values of the dtype `code`. */
static int check(Py_buffer *views, int count, int code, Py_ssize_t *n) {
    if (code < 0 || code > 2) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
        return 0;
    }
    *n = views[0].len / SIZES[code];
    for (int i = 0; i < count; i++) {
        if (views[i].len != views[0].len || views[i].len % SIZES[code]) {
            PyErr_SetString(PyExc_ValueError, "all buffers must hold the same number of values of one dtype");
            return 0;
        }
    }
    return 1;
}

/* darwin_form(out, a, b, start, seed, threshold_b, r, w, rest, code): out = a + (keep_b ? (b - a) * r : 0), blended
 * with a + (b - a) * r where w != 1 */
static PyObject *darwin_form(PyObject *self, PyObject *args) {
    Py_buffer v[3];
    unsigned long long start, seed;
    unsigned int threshold_b;
    float r, w, rest;
    int code;
    if (!PyArg_ParseTuple(args, "w*y*y*KKIfffi", &v[0], &v[1], &v[2], &start, &seed, &threshold_b, &r, &w, &rest,
                          &code))
        return NULL;
    Py_ssize_t n;
    int ok = check(v, 3, code, &n);
    if (ok) {
        darwin_loop loop = DARWIN_LOOPS[w != 1.0f][code];
        Py_BEGIN_ALLOW_THREADS
        loop(v[0].buf, v[1].buf, v[2].buf, n, start, seed, threshold_b, r, w, rest);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < 3; i++) PyBuffer_Release(&v[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* dare_ties_form(out, a, b, base, start, seed, threshold_a, threshold_b, scale_a, scale_b, use_a, use_b, r, w, rest,
 * code): DARE drop and rescale (scale = weight / density), TIES sign election, the agreeing weighted deltas summed,
 * blended as darwin_form's. use_x is 0 where density_x is 0 (no delta at all). */
static PyObject *dare_ties_form(PyObject *self, PyObject *args) {
    Py_buffer v[4];
    unsigned long long start, seed;
    unsigned int threshold_a, threshold_b;
    float scale_a, scale_b, r, w, rest;
    int use_a, use_b, code;
    if (!PyArg_ParseTuple(args, "w*y*y*y*KKIIffppfffi", &v[0], &v[1], &v[2], &v[3], &start, &seed, &threshold_a,
                          &threshold_b, &scale_a, &scale_b, &use_a, &use_b, &r, &w, &rest, &code)) return NULL;
    Py_ssize_t n;
    int ok = check(v, 4, code, &n);
    if (ok) {
        dare_loop loop = DARE_LOOPS[w != 1.0f][code];
        Py_BEGIN_ALLOW_THREADS
        loop(v[0].buf, v[1].buf, v[2].buf, v[3].buf, n, start, seed, threshold_a, threshold_b, scale_a, scale_b, use_a,
             use_b, r, w, rest);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < 4; i++) PyBuffer_Release(&v[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* bit_counts(counts, x): counts[v] += how many of the 16-bit values in x have the bit pattern v (counts: 65536
 * int64). The MRI's statistics of a bf16 or fp16 tensor follow exactly from these counts, in one read of the tensor.
 * A large tensor is counted in TABLES interleaved tables, so runs of equal values do not wait on their own previous
 * increment (eight count 100M bf16 weights in about 0.05 s, four in 0.07 s); a small one straight into counts, as the
 * tables' set-up would cost more than the count. */
#define PATTERNS 65536
#define TABLES 8
#define COUNT_BLOCK ((Py_ssize_t)1 << 30) /* per-table counts stay below 2^32 */
static void count_patterns(int64_t *total, const uint16_t *values, Py_ssize_t n, uint32_t *tables) {
    if (!tables) {
        for (Py_ssize_t i = 0; i < n; i++) total[values[i]]++;
        return;
    }
    for (Py_ssize_t block = 0; block < n; block += COUNT_BLOCK) {
        Py_ssize_t stop = block + COUNT_BLOCK < n ? block + COUNT_BLOCK : n, i = block;
        memset(tables, 0, TABLES * PATTERNS * sizeof(uint32_t));
        for (; i + TABLES <= stop; i += TABLES) {
            for (int t = 0; t < TABLES; t++) tables[t * PATTERNS + values[i + t]]++;
        }
        for (; i < stop; i++) tables[values[i]]++;
        for (Py_ssize_t v = 0; v < PATTERNS; v++) {
            int64_t sum = 0;
            for (int t = 0; t < TABLES; t++) sum += tables[t * PATTERNS + v];
            total[v] += sum;
        }
    }
}

static PyObject *bit_counts(PyObject *self, PyObject *args) {
    Py_buffer counts, x;
    if (!PyArg_ParseTuple(args, "w*y*", &counts, &x)) return NULL;
    int ok = counts.len == PATTERNS * (Py_ssize_t)sizeof(int64_t) && x.len % 2 == 0;
    Py_ssize_t n = x.len / 2;
    uint32_t *tables = ok && n >= 16 * PATTERNS ? malloc(TABLES * PATTERNS * sizeof(uint32_t)) : NULL;
    int no_memory = ok && n >= 16 * PATTERNS && !tables;
    if (ok && !no_memory) {
        Py_BEGIN_ALLOW_THREADS
        count_patterns(counts.buf, x.buf, n, tables);
        Py_END_ALLOW_THREADS
    }
    free(tables);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&x);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "bit_counts needs 65536 int64 counts and a buffer of 16-bit values");
        return NULL;
    }
    if (no_memory) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"darwin_form", darwin_form, METH_VARARGS, "fused darwin merge form over float32, bfloat16 or float16 buffers"},
    {"dare_ties_form", dare_ties_form, METH_VARARGS, "fused dare-ties merge form over float32, bfloat16 or float16 buffers"},
    {"bit_counts", bit_counts, METH_VARARGS, "histogram of the bit patterns of 16-bit values"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "darwin._kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
