/* Copies with non-temporal (streaming) stores, for large outputs of shared-memory collectives.
 *
 * A plain copy into memory that is not cached first reads every destination line
 * (read-for-ownership) and then writes it back: a third of the traffic is wasted. Streaming
 * stores write whole lines without reading them; on the 2-core CI machine two processes copying
 * 16 MiB each take ~1.8 ms this way against ~3 ms with memcpy. glibc switches to such stores
 * only above a threshold derived from the cache size (hundreds of MiB on large servers), and
 * numpy and torch never do; hence this file. It is worth it only for data nobody reads soon
 * (a collective's output that exceeds the caches), so callers choose when to use it.
 *
 * SSE2 only (every x86-64 CPU has it; wider stores measured no faster, the memory is the
 * bottleneck). Elsewhere `stream` is a plain memcpy and STREAMING is 0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAMING 1
#else
#define HAVE_STREAMING 0
#endif

#define RELEASE_GIL_FROM (64 * 1024) /* bytes: smaller copies are over before a switch pays */

static void stream_copy(char *dst, const char *src, size_t n)
{
#if HAVE_STREAMING
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (n < 256 || head >= n) {
        memcpy(dst, src, n);
        return;
    }
    memcpy(dst, src, head); /* up to the first 16-byte aligned destination address */
    dst += head;
    src += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + body, src + body, n - body);
    /* Streaming stores are weakly ordered: make them globally visible before anything the
     * caller stores next (a flag another process may act on). */
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

/* stream(dst, src): dst[:] = src for two C-contiguous buffers of the same length in bytes. */
static PyObject *py_stream(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stream(dst, src) takes exactly two buffers");
        return NULL;
    }
    Py_buffer dst, src;
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "stream: destination has %zd bytes, source %zd",
                     dst.len, src.len);
    } else if (dst.len >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS
        stream_copy(dst.buf, src.buf, (size_t)dst.len);
        Py_END_ALLOW_THREADS
    } else {
        stream_copy(dst.buf, src.buf, (size_t)dst.len);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"stream", (PyCFunction)(void (*)(void))py_stream, METH_FASTCALL,
     "stream(dst, src): copy src into dst (same length, contiguous) with streaming stores."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_streamcopy",
    "Copies with non-temporal stores (see the C file for why).", -1, methods,
};

PyMODINIT_FUNC PyInit__streamcopy(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "STREAMING", HAVE_STREAMING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
