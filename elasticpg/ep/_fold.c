/* combine's fold in one pass: acc[tokens[i]] += weights[i] * float(rows[i]), row by row.
 *
 * The torch version of the same sum (copy the rows to float32, scale them, index_add_) makes
 * three passes over the rows and writes a float32 copy of them; on the 2-core CI machine it
 * was the largest part of a combine (~0.6 ms of 973 rows x 2048 at bf16). Here each row is
 * converted, scaled and added while it is in registers.
 *
 * The result is bit-identical to the torch version (elasticpg.ep.layout.fold's fallback):
 * per element the same two roundings, (float(x) * w) then acc + that, in the same order of
 * rows. So no fused multiply-add: built with -ffp-contract=off (setup.py), and bf16 -> float
 * is exact (the bits shifted up).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define RELEASE_GIL_FROM (256 * 1024) /* row bytes: smaller folds are over before a switch pays */

/* The entry points' shared argument handling. Each takes `nbuf` buffers then `nint` integers
 * (METH_FASTCALL): `args_in` checks the count, reads the integers into `ints` and acquires the
 * buffers with their `flags` (releasing them again on failure); `args_out` releases them and
 * returns `result`, or NULL if a Python error was set meanwhile. */
#define MAX_ARGS 7
#define BUF_W (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
#define BUF_R PyBUF_C_CONTIGUOUS

static int args_in(PyObject *const *args, Py_ssize_t nargs, const char *usage, int nbuf,
                   const int *flags, Py_buffer *b, int nint, Py_ssize_t *ints)
{
    if (nargs != nbuf + nint) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", usage, nbuf + nint);
        return -1;
    }
    for (int i = 0; i < nint; i++)
        ints[i] = PyLong_AsSsize_t(args[nbuf + i]);
    if (PyErr_Occurred())
        return -1;
    for (int i = 0; i < nbuf; i++) {
        if (PyObject_GetBuffer(args[i], &b[i], flags[i]) < 0) {
            while (i--)
                PyBuffer_Release(&b[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *args_out(Py_buffer *b, int nbuf, PyObject *result)
{
    for (int i = 0; i < nbuf; i++)
        PyBuffer_Release(&b[i]);
    if (PyErr_Occurred()) {
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

static void fold_bf16(float *restrict acc, const uint16_t *restrict rows,
                      const int64_t *restrict tok, const float *restrict w, Py_ssize_t n,
                      Py_ssize_t hidden)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        float *restrict a = acc + tok[i] * hidden;
        const uint16_t *restrict r = rows + i * hidden;
        const float wi = w[i];
        for (Py_ssize_t h = 0; h < hidden; h++) {
            uint32_t bits = (uint32_t)r[h] << 16;
            float v;
            memcpy(&v, &bits, sizeof v);
            a[h] = a[h] + v * wi;
        }
    }
}

static void fold_f32(float *restrict acc, const float *restrict rows,
                     const int64_t *restrict tok, const float *restrict w, Py_ssize_t n,
                     Py_ssize_t hidden)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        float *restrict a = acc + tok[i] * hidden;
        const float *restrict r = rows + i * hidden;
        const float wi = w[i];
        for (Py_ssize_t h = 0; h < hidden; h++)
            a[h] = a[h] + r[h] * wi;
    }
}

/* Token-major: for each token, its rows (row ids ascending, -1 = none) added into its output
 * row while that row stays in L1, instead of sweeping the whole output once per row. Per
 * token the rows are added in the same (ascending) order as the row-major fold, so the sums
 * are bit-identical. */
static void fold_tokens_impl(float *restrict acc, const int64_t *restrict sel, Py_ssize_t t,
                             Py_ssize_t k, const int64_t *restrict addr,
                             const float *restrict w, Py_ssize_t hidden, int bf16)
{
    for (Py_ssize_t i = 0; i < t; i++) {
        float *restrict a = acc + i * hidden;
        for (Py_ssize_t j = 0; j < k; j++) {
            int64_t r = sel[i * k + j];
            if (r < 0 || addr[r] == 0)
                continue;
            const float wr = w[r];
            if (bf16) {
                const uint16_t *restrict x = (const uint16_t *)(uintptr_t)addr[r];
                for (Py_ssize_t h = 0; h < hidden; h++) {
                    uint32_t bits = (uint32_t)x[h] << 16;
                    float v;
                    memcpy(&v, &bits, sizeof v);
                    a[h] = a[h] + v * wr;
                }
            } else {
                const float *restrict x = (const float *)(uintptr_t)addr[r];
                for (Py_ssize_t h = 0; h < hidden; h++)
                    a[h] = a[h] + x[h] * wr;
            }
        }
    }
}

/* fold_tokens(acc, sel, addr, weights, hidden, itemsize): acc float32 [T, hidden]; sel int64
 * [T, k]: each token's row ids, ascending, -1 for none (and for a repeat); addr int64 [rows]:
 * the address of each row's data (hidden elements of bfloat16 or float32, per itemsize), 0 for
 * a row without an answer; weights float32 [rows]. Row ids are checked; the addresses are the
 * caller's (tensors it holds for the call). */
static PyObject *py_fold_tokens(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer b[MAX_ARGS];
    Py_ssize_t in[2];
    const int flags[4] = {BUF_W, BUF_R, BUF_R, BUF_R};
    if (args_in(args, nargs, "fold_tokens(acc, sel, addr, weights, hidden, itemsize)", 4, flags,
                b, 2, in) < 0)
        return NULL;
    const Py_ssize_t hidden = in[0], itemsize = in[1];
    if (hidden <= 0 || (itemsize != 2 && itemsize != 4)) {
        PyErr_SetString(PyExc_ValueError, "fold_tokens: hidden must be > 0, itemsize 2 or 4");
        return args_out(b, 4, NULL);
    }
    Py_ssize_t t = b[0].len / (4 * hidden), rows = b[2].len / 8;
    Py_ssize_t k = t ? b[1].len / 8 / t : 0;
    if (b[0].len != t * 4 * hidden || b[1].len != t * k * 8 || b[2].len != rows * 8 ||
        b[3].len != rows * 4) {
        PyErr_SetString(PyExc_ValueError, "fold_tokens: buffer sizes do not agree");
        return args_out(b, 4, NULL);
    }
    const int64_t *sel = b[1].buf;
    for (Py_ssize_t i = 0; i < t * k; i++) {
        if (sel[i] < -1 || sel[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "fold_tokens: row %lld outside -1..%zd",
                         (long long)sel[i], rows - 1);
            return args_out(b, 4, NULL);
        }
    }
    int release = rows * hidden * itemsize >= RELEASE_GIL_FROM;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    fold_tokens_impl(b[0].buf, sel, t, k, b[2].buf, b[3].buf, hidden, itemsize == 2);
    if (release)
        PyEval_RestoreThread(ts);
    return args_out(b, 4, Py_NewRef(Py_None));
}

/* fold(acc, rows, tokens, weights, hidden, itemsize): acc float32 [T, hidden], rows
 * [n, hidden] of bfloat16 (itemsize 2) or float32 (itemsize 4), tokens int64 [n] (each in
 * 0..T-1, checked), weights float32 [n]; all C-contiguous buffers. */
static PyObject *py_fold(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer b[MAX_ARGS];
    Py_ssize_t in[2];
    const int flags[4] = {BUF_W, BUF_R, BUF_R, BUF_R};
    if (args_in(args, nargs, "fold(acc, rows, tokens, weights, hidden, itemsize)", 4, flags, b,
                2, in) < 0)
        return NULL;
    const Py_ssize_t hidden = in[0], itemsize = in[1];
    if (hidden <= 0 || (itemsize != 2 && itemsize != 4)) {
        PyErr_SetString(PyExc_ValueError, "fold: hidden must be > 0, itemsize 2 or 4");
        return args_out(b, 4, NULL);
    }
    Py_ssize_t t = b[0].len / (4 * hidden), n = b[2].len / 8;
    if (b[0].len != t * 4 * hidden || b[1].len != n * hidden * itemsize ||
        b[2].len != n * 8 || b[3].len != n * 4) {
        PyErr_SetString(PyExc_ValueError, "fold: buffer sizes do not agree");
        return args_out(b, 4, NULL);
    }
    const int64_t *tok = b[2].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (tok[i] < 0 || tok[i] >= t) {
            PyErr_Format(PyExc_IndexError, "fold: token %lld outside 0..%zd",
                         (long long)tok[i], t - 1);
            return args_out(b, 4, NULL);
        }
    }
    int release = b[1].len >= RELEASE_GIL_FROM;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    if (itemsize == 2)
        fold_bf16(b[0].buf, b[1].buf, tok, b[3].buf, n, hidden);
    else
        fold_f32(b[0].buf, b[1].buf, tok, b[3].buf, n, hidden);
    if (release)
        PyEval_RestoreThread(ts);
    return args_out(b, 4, Py_NewRef(Py_None));
}

/* dispatch's fp8 quantisation in one pass, bit-identical to elasticpg.ep.layout.quantize_fp8's
 * torch ops (~11 of them, each a few microseconds of dispatch, on a few KB at small shapes):
 * per 128 channels amax = max |v| floored at 1e-4f, every value times (1/amax) * 448 rounded
 * to float32 as torch's reciprocal and multiply do, converted to float8_e4m3fn the way c10
 * does (round to nearest even; 0x7f past the largest finite), scale = amax / 448. A row
 * holding a NaN or an infinity is left to torch (returns False), whose propagation rules are
 * the reference here. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* AVX2 where the CPU has it, chosen at load time (the same IEEE operations either way) */
__attribute__((target_clones("avx2", "default")))
#endif
static int quant_rows(const void *x, uint8_t *restrict data, float *restrict scales,
                      Py_ssize_t t, Py_ssize_t hidden, int bf16)
{
    /* branch-free per value (selects, not jumps), so the compiler vectorises each loop */
    uint32_t v[128];
    const Py_ssize_t nb = hidden / 128;
    const uint32_t denorm = UINT32_C(141) << 23;
    float denorm_f;
    memcpy(&denorm_f, &denorm, sizeof denorm_f);
    for (Py_ssize_t i = 0; i < t; i++) {
        for (Py_ssize_t b = 0; b < nb; b++) {
            const Py_ssize_t at = i * hidden + b * 128;
            if (bf16) {
                const uint16_t *restrict src = (const uint16_t *)x + at;
                for (int h = 0; h < 128; h++)
                    v[h] = (uint32_t)src[h] << 16;
            } else {
                memcpy(v, (const float *)x + at, sizeof v);
            }
            /* |v| as bits: for non-negative floats the integer order is the float order */
            uint32_t top = 0;
            for (int h = 0; h < 128; h++) {
                uint32_t a = v[h] & UINT32_C(0x7fffffff);
                top = a > top ? a : top;
            }
            if (top >= UINT32_C(0x7f800000)) /* a NaN or an infinity */
                return 0;
            float amax;
            memcpy(&amax, &top, sizeof amax);
            const float floor_ = (float)1e-4;
            amax = amax < floor_ ? floor_ : amax;
            const float recip = 1.0f / amax;
            const float factor = recip * 448.0f;
            uint8_t *restrict out = data + at;
            for (int h = 0; h < 128; h++) {
                float f;
                memcpy(&f, &v[h], sizeof f);
                f = f * factor;
                uint32_t bits;
                memcpy(&bits, &f, sizeof bits);
                const uint32_t sign = bits & UINT32_C(0x80000000);
                bits ^= sign;
                /* c10's float -> float8_e4m3fn: a denormal by a float add, a normal by
                 * round-to-nearest-even on the bits, 0x7f (NaN) from 480.0f up */
                float mag, dsum;
                memcpy(&mag, &bits, sizeof mag);
                dsum = mag + denorm_f;
                uint32_t dbits;
                memcpy(&dbits, &dsum, sizeof dbits);
                const uint32_t den = dbits - denorm;
                const uint32_t nor = (bits + ((uint32_t)(7 - 127) << 23) + UINT32_C(0x7FFFF) +
                                      ((bits >> 20) & 1)) >> 20;
                /* selects as masks (bits < 2^31 here, so signed compares are right) */
                const uint32_t small = -(uint32_t)((int32_t)bits < (int32_t)(121 << 23));
                const uint32_t big = -(uint32_t)((int32_t)bits >= (int32_t)(1087 << 20));
                uint32_t r = (den & small) | (nor & ~small);
                r = (UINT32_C(0x7f) & big) | (r & ~big);
                out[h] = (uint8_t)((r & 0xff) | (sign >> 24));
            }
            scales[i * nb + b] = amax / 448.0f;
        }
    }
    return 1;
}

/* quantize_fp8(x, data, scales, hidden, itemsize): x [T, hidden] of bfloat16 (itemsize 2,
 * as int16) or float32 (4); data uint8 [T, hidden] and scales float32 [T, hidden/128] are
 * written. True when done; False (outputs unspecified) when x holds a NaN or an infinity. */
static PyObject *py_quantize_fp8(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer b[MAX_ARGS];
    Py_ssize_t in[2];
    const int flags[3] = {BUF_R, BUF_W, BUF_W};
    if (args_in(args, nargs, "quantize_fp8(x, data, scales, hidden, itemsize)", 3, flags, b, 2,
                in) < 0)
        return NULL;
    const Py_ssize_t hidden = in[0], itemsize = in[1];
    if (hidden <= 0 || hidden % 128 || (itemsize != 2 && itemsize != 4)) {
        PyErr_SetString(PyExc_ValueError,
                        "quantize_fp8: hidden must be a positive multiple of 128, itemsize 2 or 4");
        return args_out(b, 3, NULL);
    }
    Py_ssize_t t = b[0].len / (hidden * itemsize);
    if (b[0].len != t * hidden * itemsize || b[1].len != t * hidden ||
        b[2].len != t * (hidden / 128) * 4) {
        PyErr_SetString(PyExc_ValueError, "quantize_fp8: buffer sizes do not agree");
        return args_out(b, 3, NULL);
    }
    int ok = quant_rows(b[0].buf, b[1].buf, b[2].buf, t, hidden, itemsize == 2);
    return args_out(b, 3, PyBool_FromLong(ok));
}

/* copy_rows(dst, dst_rows, src, src_rows, row_bytes): dst row dst_rows[i] = src row
 * src_rows[i] (int64 indices, checked), rows of row_bytes bytes; one call in place of a torch
 * index_select per (local expert) block, which cost more in fixed overhead than the copy at
 * small shapes. A plain memcpy: the same bytes as the torch fallback. */
static PyObject *py_copy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer b[MAX_ARGS];
    Py_ssize_t rb;
    const int flags[4] = {BUF_W, BUF_R, BUF_R, BUF_R};
    if (args_in(args, nargs, "copy_rows(dst, dst_rows, src, src_rows, row_bytes)", 4, flags, b,
                1, &rb) < 0)
        return NULL;
    if (rb <= 0) {
        PyErr_SetString(PyExc_ValueError, "copy_rows: row_bytes must be > 0");
        return args_out(b, 4, NULL);
    }
    Py_ssize_t n = b[1].len / 8, nd = b[0].len / rb, ns = b[2].len / rb;
    if (b[1].len != n * 8 || b[3].len != n * 8) {
        PyErr_SetString(PyExc_ValueError, "copy_rows: index arrays do not agree");
        return args_out(b, 4, NULL);
    }
    const int64_t *di = b[1].buf, *si = b[3].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (di[i] < 0 || di[i] >= nd || si[i] < 0 || si[i] >= ns) {
            PyErr_Format(PyExc_IndexError, "copy_rows: row %zd (%lld <- %lld) outside "
                         "the buffers", i, (long long)di[i], (long long)si[i]);
            return args_out(b, 4, NULL);
        }
    }
    char *d = b[0].buf;
    const char *sp = b[2].buf;
    for (Py_ssize_t i = 0; i < n; i++)
        memcpy(d + di[i] * rb, sp + si[i] * rb, (size_t)rb);
    return args_out(b, 4, Py_NewRef(Py_None));
}

/* plan(idx, usable, row_token, row_expert, sel_row, counts, token_rows, tokens, k,
 * num_experts, local) -> rows: dispatch's send plan (layout.plan_dispatch) by a counting sort instead of ~15 numpy
 * calls on [T, k], whose fixed cost dominated at small shapes. idx int64 [T, k]; usable uint8
 * [num_experts / local]; out int64: row_token, row_expert [T * k] (the first `rows` used),
 * sel_row [T, k], counts [num_experts], token_rows [T, k] (SendPlan.token_rows: each token's
 * sel_row sorted, an entry equal to the one before it set to -1). A row is one distinct
 * (token, expert) pair whose expert's rank is usable; rows are sorted by (expert, token) and a
 * repeated selection maps to its first one's row: the same arrays as the numpy version,
 * element for element. */
static PyObject *py_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Py_buffer b[MAX_ARGS];
    Py_ssize_t v[4];
    const int flags[7] = {BUF_R, BUF_R, BUF_W, BUF_W, BUF_W, BUF_W, BUF_W};
    if (args_in(args, nargs, "plan(idx, usable, row_token, row_expert, sel_row, counts, "
                "token_rows, tokens, k, num_experts, local)", 7, flags, b, 4, v) < 0)
        return NULL;
    Py_ssize_t t = v[0], k = v[1], ne = v[2], local = v[3], n = t * k;
    if (t < 0 || k < 0 || ne <= 0 || local <= 0 || ne % local || b[0].len != n * 8 ||
        b[1].len != ne / local || b[2].len < n * 8 || b[3].len < n * 8 || b[4].len != n * 8 ||
        b[5].len != ne * 8 || b[6].len != n * 8) {
        PyErr_SetString(PyExc_ValueError, "plan: buffer sizes do not agree");
        return args_out(b, 7, NULL);
    }
    const int64_t *idx = b[0].buf;
    const uint8_t *ok = b[1].buf;
    int64_t *row_token = b[2].buf, *row_expert = b[3].buf, *sel = b[4].buf, *counts = b[5].buf;
    int64_t *trows = b[6].buf;
    int64_t *pos = PyMem_Malloc((size_t)ne * sizeof(int64_t));
    if (pos == NULL) {
        PyErr_NoMemory();
        return args_out(b, 7, NULL);
    }
    memset(counts, 0, (size_t)ne * sizeof(int64_t));
    /* pass 1: validity and repeats (sel = -1 unsent, -2 - j a repeat of selection j, else 0) */
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t e = idx[i];
        if (e < -1 || e >= ne) {
            PyMem_Free(pos);
            PyErr_Format(PyExc_ValueError, "plan: expert %lld outside -1..%zd", (long long)e,
                         ne - 1);
            return args_out(b, 7, NULL);
        }
        if (e < 0 || !ok[e / local]) {
            sel[i] = -1;
            continue;
        }
        Py_ssize_t row0 = i - i % k, j = row0;
        while (j < i && idx[j] != e)
            j++;
        if (j < i) {
            sel[i] = -2 - (int64_t)(j - row0);
            continue;
        }
        sel[i] = 0;
        counts[e]++;
    }
    int64_t acc = 0;
    for (Py_ssize_t e = 0; e < ne; e++) {
        pos[e] = acc;
        acc += counts[e];
    }
    /* pass 2: tokens in order, so each expert's rows come out in token order */
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = sel[i];
        if (s == -1)
            continue;
        if (s <= -2) {
            sel[i] = sel[i - i % k + (-2 - s)];
            continue;
        }
        int64_t e = idx[i], row = pos[e]++;
        row_token[row] = (int64_t)(i / k);
        row_expert[row] = e;
        sel[i] = row;
    }
    /* token_rows: per token, its k entries sorted (insertion sort: k is small), then every
     * entry equal to the sorted one before it set to -1 (repeats, and unsent after unsent) */
    for (Py_ssize_t r = 0; r < n; r += k) {
        int64_t *o = trows + r;
        for (Py_ssize_t j = 0; j < k; j++) {
            int64_t x = sel[r + j];
            Py_ssize_t m = j;
            while (m > 0 && o[m - 1] > x) {
                o[m] = o[m - 1];
                m--;
            }
            o[m] = x;
        }
        for (Py_ssize_t j = k - 1; j > 0; j--)
            if (o[j] == o[j - 1])
                o[j] = -1;
    }
    PyMem_Free(pos);
    return args_out(b, 7, PyLong_FromLongLong((long long)acc));
}

static PyMethodDef methods[] = {
    {"fold", (PyCFunction)(void (*)(void))py_fold, METH_FASTCALL,
     "fold(acc, rows, tokens, weights, hidden, itemsize): acc[tokens[i]] += weights[i] * "
     "rows[i], in row order."},
    {"fold_tokens", (PyCFunction)(void (*)(void))py_fold_tokens, METH_FASTCALL,
     "fold_tokens(acc, sel, addr, weights, hidden, itemsize): per token, its rows' weighted "
     "answers added in ascending row order."},
    {"quantize_fp8", (PyCFunction)(void (*)(void))py_quantize_fp8, METH_FASTCALL,
     "quantize_fp8(x, data, scales, hidden, itemsize): per-128-channel float8_e4m3fn, as "
     "layout.quantize_fp8's torch ops compute it; False if x is not all finite."},
    {"copy_rows", (PyCFunction)(void (*)(void))py_copy_rows, METH_FASTCALL,
     "copy_rows(dst, dst_rows, src, src_rows, row_bytes): dst[dst_rows[i]] = src[src_rows[i]]."},
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_FASTCALL,
     "plan(idx, usable, row_token, row_expert, sel_row, counts, token_rows, tokens, k, "
     "num_experts, local) -> rows: dispatch's send plan by a counting sort."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fold",
    "combine's one-pass fold and dispatch's fp8 quantisation (see the C file for why).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fold(void) { return PyModule_Create(&module); }
