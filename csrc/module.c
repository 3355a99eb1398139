/* module.c: the Python binding lora._C, the boundary between NumPy arrays and csrc/kernels.c.
 *
 * Every function validates every argument first (type, dtype, ndim, shapes, contiguity and
 * writeability of in-place arguments, aliasing, BLAS int range, hyper-parameter ranges),
 * allocates its outputs and scratch, and only then releases the GIL around pure C work. A
 * call that fails has touched nothing. Read-only inputs that are not aligned, native-order
 * and C-contiguous are copied (cheap next to the GEMMs); in-place arguments are rejected
 * instead, since a silent copy would lose the update.
 *
 * Error messages name the Python function and the argument:
 *   lora.functional.linear_forward: argument 'A' must have shape (r, d_in) = (8, 512), got (8, 511)
 * TypeError for a wrong type or dtype, ValueError for everything else.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "kernels.h"

#define PREFIX "lora.functional."

/* ------------------------------------------------------------------ validation helpers */

static const char *type_name(int type) {
    return type == NPY_FLOAT32 ? "float32" : type == NPY_FLOAT64 ? "float64" : "?";
}

static void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %" NPY_INTP_FMT : "%" NPY_INTP_FMT,
                                 dims[i]);
    if (used < size) snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

/* The array behind obj with dtype checked: `*type` is the dtype every argument of the call
 * must share; -1 means "take this argument's dtype" (the first array argument sets it).
 * Returns a new reference to obj itself, or NULL with TypeError set. When inplace, the
 * array must also be writeable, aligned, native-order and C-contiguous (ValueError
 * otherwise): it is never copied. Read-only inputs go through as_carray after validation. */
static PyArrayObject *get_array(const char *func, const char *name, PyObject *obj, int *type,
                                const char *type_ref, int inplace) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument '%s' must be a numpy.ndarray, got %s",
                     func, name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    int t = PyArray_TYPE(arr);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyObject *descr = PyObject_Str((PyObject *)PyArray_DESCR(arr));
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument '%s' must have dtype float32 or float64, got %S", func,
                     name, descr ? descr : Py_None);
        Py_XDECREF(descr);
        return NULL;
    }
    if (*type >= 0 && t != *type) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument '%s' must have dtype %s (the dtype of '%s'), got %s",
                     func, name, type_name(*type), type_ref, type_name(t));
        return NULL;
    }
    *type = t;
    if (inplace) {
        const char *why = NULL;
        if (!PyArray_ISWRITEABLE(arr))
            why = "writeable";
        else if (!PyArray_IS_C_CONTIGUOUS(arr))
            why = "C-contiguous";
        else if (!PyArray_ISALIGNED(arr))
            why = "aligned";
        else if (!PyArray_ISNOTSWAPPED(arr))
            why = "in native byte order";
        if (why) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: argument '%s' is updated in place and must be %s; "
                                "it is not (a copy would lose the update)",
                         func, name, why);
            return NULL;
        }
    }
    Py_INCREF(arr);
    return arr;
}

/* Replaces a read-only input by an aligned, native-order, C-contiguous copy when it is not
 * one already. Called only after every check passed, so a huge broadcast view is refused
 * by the size checks before anything is copied. */
static int as_carray(PyArrayObject **a) {
    if (!*a || (PyArray_ISCARRAY_RO(*a) && PyArray_ISNOTSWAPPED(*a))) return 0;
    PyArrayObject *c = (PyArrayObject *)PyArray_FromAny(
        (PyObject *)*a, PyArray_DescrFromType(PyArray_TYPE(*a)), 0, 0, NPY_ARRAY_CARRAY_RO, NULL);
    if (!c) return -1;
    Py_DECREF(*a);
    *a = c;
    return 0;
}

static int check_ndim(const char *func, const char *name, PyArrayObject *a, int ndim,
                      int at_least) {
    int nd = PyArray_NDIM(a);
    if (at_least ? nd >= ndim : nd == ndim) return 0;
    PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must be %s%d-D, got %d-D", func,
                 name, at_least ? "at least " : "", ndim, nd);
    return -1;
}

/* Checks a's shape against `want` (ndim entries); `what` names the dims, e.g. "(r, d_in)". */
static int check_shape(const char *func, const char *name, PyArrayObject *a, int ndim,
                       const npy_intp *want, const char *what) {
    if (PyArray_NDIM(a) == ndim &&
        (ndim == 0 || memcmp(PyArray_DIMS(a), want, ndim * sizeof(npy_intp)) == 0))
        return 0;
    char want_s[256], got_s[256];
    format_shape(want_s, sizeof want_s, ndim, want);
    format_shape(got_s, sizeof got_s, PyArray_NDIM(a), PyArray_DIMS(a));
    PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must have shape %s = %s, got %s",
                 func, name, what, want_s, got_s);
    return -1;
}

/* BLAS takes int sizes: refuse anything larger before it reaches a BLAS call. */
static int check_blas_size(const char *func, const char *arg, const char *what, npy_intp size,
                           npy_intp lo) {
    if (size >= lo && size <= INT_MAX) return 0;
    if (size < lo)
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument '%s': %s must be at least %" NPY_INTP_FMT
                            ", got %" NPY_INTP_FMT,
                     func, arg, what, lo, size);
    else
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument '%s': %s is %" NPY_INTP_FMT
                            ", beyond what BLAS takes (at most %d)",
                     func, arg, what, size, INT_MAX);
    return -1;
}

/* The byte range [lo, hi) an array's elements span, for any strides (negative included). */
static void extent(PyArrayObject *a, const char **lo, const char **hi) {
    const char *start = PyArray_BYTES(a), *end = start + PyArray_ITEMSIZE(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp step = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (step < 0)
            start += step;
        else
            end += step;
    }
    *lo = start;
    *hi = end;
}

static int overlap(PyArrayObject *a, PyArrayObject *b) {
    if (!a || !b || PyArray_SIZE(a) == 0 || PyArray_SIZE(b) == 0) return 0;
    const char *a0, *a1, *b0, *b1;
    extent(a, &a0, &a1);
    extent(b, &b0, &b1);
    return a0 < b1 && b0 < a1;
}

static int check_no_overlap(const char *func, const char *out, PyArrayObject *a,
                            const char *in, PyArrayObject *b) {
    if (!overlap(a, b)) return 0;
    PyErr_Format(PyExc_ValueError,
                 PREFIX "%s: argument '%s' shares memory with argument '%s'; they must be "
                        "separate arrays",
                 func, out, in);
    return -1;
}

enum { REAL_ANY = 0, REAL_NONNEG = 1, REAL_UNIT = 2 /* in [0, 1) */ };

/* A finite real number in the stated range, or -1 with TypeError/ValueError. */
static int get_real(const char *func, const char *name, PyObject *obj, int range, double *out) {
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument '%s' must be a real number, got %s",
                     func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *expected = NULL;
    if (!isfinite(v))
        expected = "a finite number";
    else if (range == REAL_NONNEG && v < 0)
        expected = "a number >= 0";
    else if (range == REAL_UNIT && !(v >= 0 && v < 1))
        expected = "a number in [0, 1)";
    if (expected) {
        PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must be %s, got %R", func, name,
                     expected, obj);
        return -1;
    }
    *out = v;
    return 0;
}

/* The dropout seed: required (an int in [0, 2**64)) when dropout > 0, ignored otherwise. */
static int get_seed(const char *func, PyObject *obj, double p, uint64_t *out) {
    *out = 0;
    if (obj == NULL || obj == Py_None) {
        if (p > 0) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: argument 'seed' must be an int when dropout > 0 (the "
                                "backward pass regenerates the mask from it), got None",
                         func);
            return -1;
        }
        return 0;
    }
    if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument 'seed' must be an int, got %s", func,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *as_int = PyNumber_Index(obj);
    if (!as_int) return -1;
    unsigned long long s = PyLong_AsUnsignedLongLong(as_int);
    Py_DECREF(as_int);
    if (s == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, PREFIX "%s: argument 'seed' must be in [0, 2**64), got %R",
                     func, obj);
        return -1;
    }
    *out = (uint64_t)s;
    return 0;
}

/* A new C-contiguous array of `type` with the leading dims of `like` and last dim `last`. */
static PyArrayObject *new_like_rows(PyArrayObject *like, npy_intp last, int type) {
    npy_intp dims[NPY_MAXDIMS];
    int nd = PyArray_NDIM(like);
    memcpy(dims, PyArray_DIMS(like), nd * sizeof(npy_intp));
    dims[nd - 1] = last;
    return (PyArrayObject *)PyArray_SimpleNew(nd, dims, type);
}

static npy_intp leading_rows(PyArrayObject *a) {
    npy_intp n = 1;
    for (int i = 0; i < PyArray_NDIM(a) - 1; i++) n *= PyArray_DIM(a, i);
    return n;
}

/* Checks that `a` has the leading dims of `like` and last dim `last`. */
static int check_rows_like(const char *func, const char *name, PyArrayObject *a,
                           PyArrayObject *like, npy_intp last, const char *what) {
    npy_intp want[NPY_MAXDIMS];
    int nd = PyArray_NDIM(like);
    memcpy(want, PyArray_DIMS(like), nd * sizeof(npy_intp));
    want[nd - 1] = last;
    return check_shape(func, name, a, nd, want, what);
}

/* Memory for the kernels, 64-byte aligned so that their vector loads of it never straddle
 * two cache lines. Freed with free(). */
static void *alloc_bytes(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) {
        PyErr_NoMemory();
        return NULL;
    }
    return p;
}

/* The kernels' scratch, given back with give_scratch. Up to SCRATCH_KEEP bytes come from
 * one of SCRATCH_SLOTS buffers kept between calls (a call may hold two: its own and the
 * packed GEMM's), each grown to the largest request it has met; a slot another thread holds
 * is skipped, and beyond that plain allocations. Allocated and freed on every call instead,
 * a training loop's scratch moved glibc's heap so that the loop's output arrays were paged
 * in anew: at n = 2048, d = 1024, r = 16, ~1000 page faults per forward + backward, 41 ms a
 * step against 36 with the scratch kept. Sanitizer builds allocate every time, so that ASan
 * sees each request's bounds. */
#define SCRATCH_SLOTS 2
#define SCRATCH_KEEP ((size_t)16 << 20)

static struct {
    pthread_mutex_t lock;
    void *buf;
    size_t bytes;
} scratch_slots[SCRATCH_SLOTS] = {{PTHREAD_MUTEX_INITIALIZER, NULL, 0},
                                  {PTHREAD_MUTEX_INITIALIZER, NULL, 0}};

static void *take_bytes(size_t bytes) {
#ifndef LORA_NO_SCRATCH_CACHE
    for (int i = 0; bytes <= SCRATCH_KEEP && i < SCRATCH_SLOTS; i++) {
        if (pthread_mutex_trylock(&scratch_slots[i].lock) != 0) continue;
        void *buf = scratch_slots[i].buf;
        if (!buf || scratch_slots[i].bytes < bytes) {
            void *old = buf;
            if (!(buf = alloc_bytes(bytes))) {
                pthread_mutex_unlock(&scratch_slots[i].lock);
                return NULL;
            }
            /* published before the old one is freed: give_scratch, reading it unlocked from
             * another thread, never sees a pointer malloc may hand out again */
            __atomic_store_n(&scratch_slots[i].buf, buf, __ATOMIC_RELEASE);
            scratch_slots[i].bytes = bytes;
            free(old);
        }
        return buf;
    }
#endif
    return alloc_bytes(bytes);
}

static void *take_scratch(size_t elems, int type) {
    return take_bytes(elems * (type == NPY_FLOAT32 ? sizeof(float) : sizeof(double)));
}

/* Gives back what take_scratch or take_bytes returned (NULL: nothing). */
static void give_scratch(void *p) {
    for (int i = 0; p && i < SCRATCH_SLOTS; i++)
        if (p == __atomic_load_n(&scratch_slots[i].buf, __ATOMIC_ACQUIRE)) {
            pthread_mutex_unlock(&scratch_slots[i].lock);
            return;
        }
    free(p);
}

/* d_out and d_in from a 2-D weight: (d_out, d_in), or (d_in, d_out) when wt (fan_in_fan_out). */
static int check_weight_dims(const char *func, PyArrayObject *weight, int wt, npy_intp *d_out,
                             npy_intp *d_in) {
    *d_out = PyArray_DIM(weight, wt ? 1 : 0);
    *d_in = PyArray_DIM(weight, wt ? 0 : 1);
    return check_blas_size(func, "weight", wt ? "d_out (weight.shape[1], fan_in_fan_out)"
                                              : "d_out (weight.shape[0])", *d_out, 1) ||
           check_blas_size(func, "weight", wt ? "d_in (weight.shape[0], fan_in_fan_out)"
                                              : "d_in (weight.shape[1])", *d_in, 1);
}

/* A 2-D weight array: a new reference, with d_out and d_in from its shape (see
 * check_weight_dims), or NULL with the error set. */
static PyArrayObject *get_weight_array(const char *func, PyObject *obj, int *type,
                                       const char *type_ref, int wt, npy_intp *d_out,
                                       npy_intp *d_in) {
    PyArrayObject *weight = get_array(func, "weight", obj, type, type_ref, 0);
    if (weight && (check_ndim(func, "weight", weight, 2, 0) ||
                   check_weight_dims(func, weight, wt, d_out, d_in))) {
        Py_DECREF(weight);
        return NULL;
    }
    return weight;
}

/* The shapes of a LoRA layer: weight (d_out, d_in) (or (d_in, d_out) when fan_in_fan_out),
 * A (r, d_in), B (d_out, r). */
typedef struct {
    npy_intp d_out, d_in, r;
} LoraDims;

static int check_lora_weights(const char *func, PyArrayObject *A, PyArrayObject *B,
                              LoraDims *dims) {
    if (check_ndim(func, "A", A, 2, 0) || check_ndim(func, "B", B, 2, 0)) return -1;
    dims->r = PyArray_DIM(A, 0);
    if (check_blas_size(func, "A", "the rank r (A.shape[0])", dims->r, 1)) return -1;
    npy_intp want_a[2] = {dims->r, dims->d_in}, want_b[2] = {dims->d_out, dims->r};
    if (check_shape(func, "A", A, 2, want_a, "(r, d_in)") ||
        check_shape(func, "B", B, 2, want_b, "(d_out, r)"))
        return -1;
    return 0;
}

/* ------------------------------------------------------------------ PackedWeight
 * A frozen weight copied once into the panels that lora's packed GEMM reads (see "packed
 * weights" in csrc/kernels_impl.inc): W^T's for forwards and, with backward=True, W's for the
 * input gradients. The object keeps no reference to the weight it was made from; its panels
 * are read-only arrays, so a PackedWeight never changes after it is made. */

typedef struct {
    PyObject_HEAD
    PyArrayObject *fwd, *bwd; /* bwd NULL when packed without backward */
    npy_intp d_out, d_in;
    int type;
} PackedWeight;

static PyTypeObject PackedWeightType;

static PyArrayObject *new_panels(npy_intp N, npy_intp K, int type) {
    const npy_intp width = LORA_PANEL_BYTES / (type == NPY_FLOAT32 ? 4 : 8);
    npy_intp dims[3] = {(N + width - 1) / width, K, width};
    return (PyArrayObject *)PyArray_SimpleNew(3, dims, type);
}

static PyObject *packed_new(PyTypeObject *cls, PyObject *args, PyObject *kwds) {
    static const char *func = "PackedWeight";
    static char *kwlist[] = {"weight", "fan_in_fan_out", "backward", NULL};
    PyObject *w_o;
    int wt = 0, backward = 1, type = -1;
    PyArrayObject *weight = NULL;
    PackedWeight *self = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$pp:PackedWeight", kwlist, &w_o, &wt,
                                     &backward))
        return NULL;
    npy_intp d_out, d_in;
    if (!(weight = get_weight_array(func, w_o, &type, "weight", wt, &d_out, &d_in)))
        return NULL;
    if (as_carray(&weight)) goto fail;
    if (!(self = (PackedWeight *)cls->tp_alloc(cls, 0))) goto fail;
    self->d_out = d_out, self->d_in = d_in, self->type = type;
    if (!(self->fwd = new_panels(d_out, d_in, type))) goto fail;
    if (backward && !(self->bwd = new_panels(d_in, d_out, type))) goto fail;
    /* forward: panels of W^T (d_in, d_out); backward: of W (d_out, d_in) */
    void *fwd = PyArray_DATA(self->fwd), *bwd = self->bwd ? PyArray_DATA(self->bwd) : NULL;
    const void *w = PyArray_DATA(weight);
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32) {
        pack_panels_f32(fwd, w, d_in, d_out, !wt);
        if (bwd) pack_panels_f32(bwd, w, d_out, d_in, wt);
    } else {
        pack_panels_f64(fwd, w, d_in, d_out, !wt);
        if (bwd) pack_panels_f64(bwd, w, d_out, d_in, wt);
    }
    Py_END_ALLOW_THREADS;
    PyArray_CLEARFLAGS(self->fwd, NPY_ARRAY_WRITEABLE);
    if (self->bwd) PyArray_CLEARFLAGS(self->bwd, NPY_ARRAY_WRITEABLE);
    Py_DECREF(weight);
    return (PyObject *)self;
fail:
    Py_XDECREF(weight);
    Py_XDECREF(self);
    return NULL;
}

static void packed_dealloc(PackedWeight *self) {
    Py_XDECREF(self->fwd);
    Py_XDECREF(self->bwd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *packed_shape(PackedWeight *self, void *closure) {
    (void)closure;
    return Py_BuildValue("(nn)", (Py_ssize_t)self->d_out, (Py_ssize_t)self->d_in);
}

static PyObject *packed_dtype(PackedWeight *self, void *closure) {
    (void)closure;
    return (PyObject *)PyArray_DescrFromType(self->type);
}

static PyObject *packed_forward(PackedWeight *self, void *closure) {
    (void)closure;
    return Py_NewRef((PyObject *)self->fwd);
}

static PyObject *packed_backward(PackedWeight *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->bwd ? (PyObject *)self->bwd : Py_None);
}

static PyObject *packed_max_rows(PackedWeight *self, void *closure) {
    (void)closure;
    const size_t elsize = self->type == NPY_FLOAT32 ? sizeof(float) : sizeof(double);
    return PyLong_FromSize_t(lora_panel_max_rows(elsize));
}

static PyObject *packed_nbytes(PackedWeight *self, void *closure) {
    (void)closure;
    npy_intp n = PyArray_NBYTES(self->fwd) + (self->bwd ? PyArray_NBYTES(self->bwd) : 0);
    return PyLong_FromSsize_t((Py_ssize_t)n);
}

static PyObject *packed_repr(PackedWeight *self) {
    return PyUnicode_FromFormat("PackedWeight(shape=(%zd, %zd), dtype=%s, backward=%s)",
                                (Py_ssize_t)self->d_out, (Py_ssize_t)self->d_in,
                                type_name(self->type), self->bwd ? "True" : "False");
}

static PyGetSetDef packed_getset[] = {
    {"shape", (getter)packed_shape, NULL, "(d_out, d_in), the weight's shape as PyTorch has it",
     NULL},
    {"dtype", (getter)packed_dtype, NULL, "float32 or float64", NULL},
    {"forward_panels", (getter)packed_forward, NULL,
     "W.T's panels, (ceil(d_out / w), d_in, w) with w = 128 bytes of the dtype; read-only",
     NULL},
    {"backward_panels", (getter)packed_backward, NULL,
     "W's panels, (ceil(d_in / w), d_out, w), or None when packed without backward; read-only",
     NULL},
    {"nbytes", (getter)packed_nbytes, NULL, "bytes held by the panels", NULL},
    {"max_rows", (getter)packed_max_rows, NULL,
     "rows of input up to which the packed GEMM is as fast as OpenBLAS on the weight itself\n"
     "or faster, on this CPU and for this dtype; the layers use the PackedWeight up to here",
     NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(packed_doc,
"PackedWeight(weight, *, fan_in_fan_out=False, backward=True)\n--\n\n"
"A frozen weight copied once into the layout of lora's packed GEMM, for layers that\n"
"see many small batches (serving, small-batch fine-tuning). It stands wherever a weight\n"
"goes in linear_forward, linear_backward, dense_forward and dense_backward.\n\n"
"OpenBLAS repacks the weight on every call; a PackedWeight is packed once. At d = 4096\n"
"on AVX-512 this makes a 64-row float32 product 1.2-1.5x and an 8-row one 3.3-4.1x faster\n"
"than OpenBLAS (docs/performance.md). Beyond max_rows rows of input (float32: 512 with\n"
"AVX-512, 64 without; float64: 64 and 32) OpenBLAS on the weight itself is as fast or\n"
"faster; the layers use the PackedWeight up to there.\n\n"
"Parameters\n----------\n"
"weight : ndarray, shape (d_out, d_in), or (d_in, d_out) when fan_in_fan_out\n"
"    Copied: the PackedWeight keeps no reference to it and does not see later changes\n"
"    (after merging an adapter into the weight, pack it again).\n"
"fan_in_fan_out : bool\n    weight is stored (d_in, d_out), as GPT-2's Conv1D.\n"
"backward : bool\n"
"    Also pack W for input gradients (linear_backward, dense_backward with need_dx).\n"
"    Without it the PackedWeight holds one copy of the weight's size; with it, two.");

static PyTypeObject PackedWeightType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lora.functional.PackedWeight",
    .tp_basicsize = sizeof(PackedWeight),
    .tp_dealloc = (destructor)packed_dealloc,
    .tp_repr = (reprfunc)packed_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = packed_doc,
    .tp_getset = packed_getset,
    .tp_new = packed_new,
};

/* The `weight` argument of the linear and dense functions: an array (*weight, with
 * fan_in_fan_out = wt) or a PackedWeight (*packed, with wt False), both new references, the
 * other left NULL; d_out and d_in from either. `direction` names the panels the call
 * needs, 0 forward, 1 backward, -1 none. */
static int get_weight(const char *func, PyObject *obj, int *type, const char *type_ref, int wt,
                      int direction, PyArrayObject **weight, PackedWeight **packed,
                      npy_intp *d_out, npy_intp *d_in) {
    *weight = NULL, *packed = NULL;
    if (!PyObject_TypeCheck(obj, &PackedWeightType))
        return (*weight = get_weight_array(func, obj, type, type_ref, wt, d_out, d_in)) ? 0 : -1;
    PackedWeight *pw = (PackedWeight *)obj;
    if (*type >= 0 && pw->type != *type) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'weight' must have dtype %s (the dtype of '%s'), got a "
                            "PackedWeight of %s",
                     func, type_name(*type), type_ref, type_name(pw->type));
        return -1;
    }
    if (wt) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: fan_in_fan_out must be False with a PackedWeight (its layout "
                            "was given when it was packed), got True",
                     func);
        return -1;
    }
    if (direction == 1 && !pw->bwd) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'weight' is a PackedWeight made with backward=False, "
                            "which has no panels for dx; pack it with backward=True, or pass "
                            "need_dx=False",
                     func);
        return -1;
    }
    *type = pw->type;
    *d_out = pw->d_out, *d_in = pw->d_in;
    *packed = (PackedWeight *)Py_NewRef(obj);
    return 0;
}

/* The kernels' view of a PackedWeight for one direction, with its scratch allocated; NULL
 * (and no error) for an unpacked weight. Give pk->xp back with give_scratch. */
static int packed_args(PackedWeight *pw, int direction, int type, npy_intp n, LoraPacked *pk,
                       const LoraPacked **out) {
    *out = NULL;
    pk->xp = NULL;
    if (!pw || direction < 0) return 0;
    PyArrayObject *panels = direction ? pw->bwd : pw->fwd;
    pk->panels = PyArray_DATA(panels);
    pk->parts = lora_panel_parts((size_t)PyArray_DIM(panels, 0));
    const size_t K = (size_t)PyArray_DIM(panels, 1), elem = type == NPY_FLOAT32 ? 4 : 8;
    if (!(pk->xp = take_scratch(lora_panel_scratch_elems(pk->parts, (size_t)n, K, elem), type)))
        return -1;
    *out = pk;
    return 0;
}

/* The optional `residual` of the forwards: y's shape ((..., d_out), the leading dims of x),
 * read only. NULL with no error when obj is None. */
static PyArrayObject *get_residual(const char *func, PyObject *obj, int *type, PyArrayObject *x,
                                   npy_intp d_out) {
    if (obj == Py_None) return NULL;
    PyArrayObject *res = get_array(func, "residual", obj, type, "x", 0);
    if (res && check_rows_like(func, "residual", res, x, d_out,
                               "(..., d_out), the shape of y")) {
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

/* The optional `add_dx_to` of the backwards: dx's shape, updated in place (dx is added to
 * it), so writeable and C-contiguous, sharing no memory with any input, and only with
 * need_dx. NULL with no error when obj is None. */
static PyArrayObject *get_add_dx_to(const char *func, PyObject *obj, int need_dx, int *type,
                                    PyArrayObject *x, npy_intp d_in, PyArrayObject **inputs,
                                    const char **names, int n_inputs) {
    if (obj == Py_None) return NULL;
    if (!need_dx) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'add_dx_to' needs need_dx=True, got need_dx=False",
                     func);
        return NULL;
    }
    PyArrayObject *acc = get_array(func, "add_dx_to", obj, type, "dy", 1);
    if (!acc) return NULL;
    if (check_rows_like(func, "add_dx_to", acc, x, d_in, "(..., d_in), the shape of dx"))
        goto fail;
    for (int i = 0; i < n_inputs; i++)
        if (check_no_overlap(func, "add_dx_to", acc, names[i], inputs[i])) goto fail;
    return acc;
fail:
    Py_DECREF(acc);
    return NULL;
}

/* ------------------------------------------------------------------ linear_forward */

PyDoc_STRVAR(linear_forward_doc,
"linear_forward(x, weight, A, B, scale, bias=None, *, dropout=0.0, seed=None,\n"
"               fan_in_fan_out=False, residual=None)\n--\n\n"
"Forward pass of a LoRA linear layer.\n\n"
"Computes ``y = x @ weight.T + bias + scale * (drop(x) @ A.T) @ B.T (+ residual)``.\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d_in)\n"
"weight : ndarray, shape (d_out, d_in)\n"
"A : ndarray, shape (r, d_in)\n"
"B : ndarray, shape (d_out, r)\n"
"scale : float\n    The LoRA scaling, lora_alpha / r (or lora_alpha / sqrt(r) for rsLoRA).\n"
"bias : ndarray, shape (d_out,), optional\n"
"dropout : float in [0, 1)\n    Dropout probability on the LoRA branch's input.\n"
"seed : int, required when dropout > 0\n"
"    Key of the dropout mask; pass the same seed to linear_backward.\n"
"fan_in_fan_out : bool\n"
"    weight is stored (d_in, d_out), as GPT-2's Conv1D: ``y = x @ weight + ...``; it is\n"
"    read in place, never transposed into a copy.\n"
"residual : ndarray, shape (..., d_out), optional\n"
"    Added to y in the pass that writes the bias: a transformer's skip connection\n"
"    at no extra pass over memory.\n\n"
"Returns\n-------\n"
"y : ndarray, shape (..., d_out)\n"
"xa : ndarray, shape (..., r)\n    drop(x) @ A.T, kept for linear_backward.\n\n"
"All arrays share one dtype, float32 or float64.");

static PyObject *linear_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "linear_forward";
    static char *kwlist[] = {"x",    "weight",  "A",    "B",           "scale",
                             "bias", "dropout", "seed", "fan_in_fan_out", "residual", NULL};
    PyObject *x_o, *w_o, *a_o, *b_o, *scale_o, *bias_o = Py_None, *drop_o = NULL, *seed_o = NULL;
    PyObject *res_o = Py_None;
    int wt = 0;
    PyArrayObject *x = NULL, *weight = NULL, *A = NULL, *B = NULL, *bias = NULL, *res = NULL;
    PyArrayObject *y = NULL, *xa = NULL;
    PackedWeight *packed = NULL;
    LoraPacked pk_args = {NULL, NULL, 0};
    const LoraPacked *pk = NULL;
    void *scratch = NULL;
    int type = -1;
    double scale, p = 0.0;
    uint64_t seed;
    LoraDims dm;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|O$OOpO:linear_forward", kwlist, &x_o,
                                     &w_o, &a_o, &b_o, &scale_o, &bias_o, &drop_o, &seed_o, &wt,
                                     &res_o))
        return NULL;
    if (!(x = get_array(func, "x", x_o, &type, "x", 0))) goto fail;
    if (get_weight(func, w_o, &type, "x", wt, 0, &weight, &packed, &dm.d_out, &dm.d_in))
        goto fail;
    if (!(A = get_array(func, "A", a_o, &type, "x", 0))) goto fail;
    if (!(B = get_array(func, "B", b_o, &type, "x", 0))) goto fail;
    if (bias_o != Py_None && !(bias = get_array(func, "bias", bias_o, &type, "x", 0))) goto fail;
    if (check_lora_weights(func, A, B, &dm)) goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    if (check_rows_like(func, "x", x, x, dm.d_in, "(..., d_in)")) goto fail;
    npy_intp n = leading_rows(x);
    if (check_blas_size(func, "x", "the number of rows of x", n, 0)) goto fail;
    if (bias && check_shape(func, "bias", bias, 1, &dm.d_out, "(d_out,)")) goto fail;
    if (!(res = get_residual(func, res_o, &type, x, dm.d_out)) && PyErr_Occurred()) goto fail;
    if (get_real(func, "scale", scale_o, REAL_ANY, &scale)) goto fail;
    if (drop_o && get_real(func, "dropout", drop_o, REAL_UNIT, &p)) goto fail;
    if (get_seed(func, seed_o, p, &seed)) goto fail;
    if (as_carray(&x) || as_carray(&weight) || as_carray(&A) || as_carray(&B) ||
        as_carray(&bias) || as_carray(&res))
        goto fail;

    if (!(y = new_like_rows(x, dm.d_out, type))) goto fail;
    if (!(xa = new_like_rows(x, dm.r, type))) goto fail;
    if (!(scratch = take_scratch(lora_scratch_elems(n, dm.d_in, dm.d_out, dm.r, p > 0, 1), type)))
        goto fail;
    if (packed_args(packed, 0, type, n, &pk_args, &pk)) goto fail;
    const void *w_p = weight ? PyArray_DATA(weight) : NULL;

    const void *bias_p = bias ? PyArray_DATA(bias) : NULL, *res_p = res ? PyArray_DATA(res) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        lora_forward_f32(PyArray_DATA(y), PyArray_DATA(xa), scratch, PyArray_DATA(x), w_p, bias_p,
                         res_p, PyArray_DATA(A), PyArray_DATA(B), (float)scale, p, seed, n,
                         dm.d_in, dm.d_out, dm.r, wt, pk);
    else
        lora_forward_f64(PyArray_DATA(y), PyArray_DATA(xa), scratch, PyArray_DATA(x), w_p, bias_p,
                         res_p, PyArray_DATA(A), PyArray_DATA(B), scale, p, seed, n, dm.d_in,
                         dm.d_out, dm.r, wt, pk);
    Py_END_ALLOW_THREADS;

    give_scratch(scratch);
    give_scratch(pk_args.xp);
    Py_DECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_DECREF(A);
    Py_DECREF(B);
    Py_XDECREF(bias);
    Py_XDECREF(res);
    return Py_BuildValue("(NN)", y, xa);
fail:
    give_scratch(scratch);
    give_scratch(pk_args.xp);
    Py_XDECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_XDECREF(A);
    Py_XDECREF(B);
    Py_XDECREF(bias);
    Py_XDECREF(res);
    Py_XDECREF(y);
    Py_XDECREF(xa);
    return NULL;
}

/* ------------------------------------------------------------------ linear_backward */

PyDoc_STRVAR(linear_backward_doc,
"linear_backward(dy, x, xa, weight, A, B, scale, *, need_dx=True, dropout=0.0, seed=None,\n"
"                fan_in_fan_out=False, add_dx_to=None)\n--\n\n"
"Backward pass of linear_forward. The frozen weight gets no gradient.\n\n"
"Parameters\n----------\n"
"dy : ndarray, shape (..., d_out)\n    Gradient of the loss with respect to y.\n"
"x : ndarray, shape (..., d_in)\n"
"xa : ndarray, shape (..., r)\n    As returned by linear_forward.\n"
"weight, A, B, scale, fan_in_fan_out : as for linear_forward\n"
"need_dx : bool\n    Whether to compute the input gradient.\n"
"dropout, seed : the values given to linear_forward\n"
"add_dx_to : ndarray, shape (..., d_in), optional\n"
"    dx is added to this array in place (writeable, C-contiguous, sharing no memory\n"
"    with the inputs), which is then returned as dx: the sum of the gradients of\n"
"    several layers reading one input, with no temporary. Needs need_dx.\n\n"
"Returns\n-------\n"
"dx : ndarray, shape (..., d_in), or None when need_dx is False\n"
"dA : ndarray, shape (r, d_in)\n"
"dB : ndarray, shape (d_out, r)");

static PyObject *linear_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "linear_backward";
    static char *kwlist[] = {"dy",      "x",       "xa",      "weight", "A",
                             "B",       "scale",   "need_dx", "dropout", "seed",
                             "fan_in_fan_out", "add_dx_to", NULL};
    PyObject *dy_o, *x_o, *xa_o, *w_o, *a_o, *b_o, *scale_o, *drop_o = NULL, *seed_o = NULL;
    PyObject *acc_o = Py_None;
    int need_dx = 1, wt = 0;
    PyArrayObject *dy = NULL, *x = NULL, *xa = NULL, *weight = NULL, *A = NULL, *B = NULL;
    PyArrayObject *dx = NULL, *dA = NULL, *dB = NULL;
    PackedWeight *packed = NULL;
    LoraPacked pk_args = {NULL, NULL, 0};
    const LoraPacked *pk = NULL;
    void *scratch = NULL;
    int type = -1;
    double scale, p = 0.0;
    uint64_t seed;
    LoraDims dm;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO|$pOOpO:linear_backward", kwlist,
                                     &dy_o, &x_o, &xa_o, &w_o, &a_o, &b_o, &scale_o, &need_dx,
                                     &drop_o, &seed_o, &wt, &acc_o))
        return NULL;
    if (!(dy = get_array(func, "dy", dy_o, &type, "dy", 0))) goto fail;
    if (!(x = get_array(func, "x", x_o, &type, "dy", 0))) goto fail;
    if (!(xa = get_array(func, "xa", xa_o, &type, "dy", 0))) goto fail;
    if (get_weight(func, w_o, &type, "dy", wt, need_dx ? 1 : -1, &weight, &packed, &dm.d_out,
                   &dm.d_in))
        goto fail;
    if (!(A = get_array(func, "A", a_o, &type, "dy", 0))) goto fail;
    if (!(B = get_array(func, "B", b_o, &type, "dy", 0))) goto fail;
    if (check_lora_weights(func, A, B, &dm)) goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    if (check_rows_like(func, "x", x, x, dm.d_in, "(..., d_in)")) goto fail;
    if (check_rows_like(func, "dy", dy, x, dm.d_out, "(..., d_out) with the leading dims of x"))
        goto fail;
    if (check_rows_like(func, "xa", xa, x, dm.r, "(..., r) with the leading dims of x"))
        goto fail;
    npy_intp n = leading_rows(x);
    if (check_blas_size(func, "x", "the number of rows of x", n, 0)) goto fail;
    if (get_real(func, "scale", scale_o, REAL_ANY, &scale)) goto fail;
    if (drop_o && get_real(func, "dropout", drop_o, REAL_UNIT, &p)) goto fail;
    if (get_seed(func, seed_o, p, &seed)) goto fail;
    PyArrayObject *inputs[] = {dy, x, xa, A, B, weight};
    const char *names[] = {"dy", "x", "xa", "A", "B", "weight"};
    if (!(dx = get_add_dx_to(func, acc_o, need_dx, &type, x, dm.d_in, inputs, names,
                             weight ? 6 : 5)) &&
        PyErr_Occurred())
        goto fail;
    const int acc = dx != NULL;
    if (as_carray(&dy) || as_carray(&x) || as_carray(&xa) || as_carray(&weight) || as_carray(&A) ||
        as_carray(&B))
        goto fail;

    if (need_dx && !dx && !(dx = new_like_rows(x, dm.d_in, type))) goto fail;
    npy_intp a_dims[2] = {dm.r, dm.d_in}, b_dims[2] = {dm.d_out, dm.r};
    if (!(dA = (PyArrayObject *)PyArray_SimpleNew(2, a_dims, type))) goto fail;
    if (!(dB = (PyArrayObject *)PyArray_SimpleNew(2, b_dims, type))) goto fail;
    const size_t parts = lora_backward_parts((size_t)n, (size_t)dm.d_in, (size_t)dm.d_out);
    if (!(scratch = take_scratch(lora_scratch_elems(n, dm.d_in, dm.d_out, dm.r, p > 0, parts),
                                  type)))
        goto fail;
    if (packed_args(packed, need_dx ? 1 : -1, type, n, &pk_args, &pk)) goto fail;
    const void *w_p = weight ? PyArray_DATA(weight) : NULL;

    void *dx_p = dx ? PyArray_DATA(dx) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        lora_backward_f32(dx_p, PyArray_DATA(dA), PyArray_DATA(dB), scratch, PyArray_DATA(dy),
                          PyArray_DATA(x), PyArray_DATA(xa), w_p, PyArray_DATA(A),
                          PyArray_DATA(B), (float)scale, p, seed, n, dm.d_in, dm.d_out, dm.r,
                          parts, wt, acc, pk);
    else
        lora_backward_f64(dx_p, PyArray_DATA(dA), PyArray_DATA(dB), scratch, PyArray_DATA(dy),
                          PyArray_DATA(x), PyArray_DATA(xa), w_p, PyArray_DATA(A),
                          PyArray_DATA(B), scale, p, seed, n, dm.d_in, dm.d_out, dm.r, parts, wt,
                          acc, pk);
    Py_END_ALLOW_THREADS;

    give_scratch(scratch);
    give_scratch(pk_args.xp);
    Py_DECREF(dy);
    Py_DECREF(x);
    Py_DECREF(xa);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_DECREF(A);
    Py_DECREF(B);
    if (!dx) {
        Py_INCREF(Py_None);
        return Py_BuildValue("(NNN)", Py_None, dA, dB);
    }
    return Py_BuildValue("(NNN)", dx, dA, dB);
fail:
    give_scratch(scratch);
    give_scratch(pk_args.xp);
    Py_XDECREF(packed);
    Py_XDECREF(dy);
    Py_XDECREF(x);
    Py_XDECREF(xa);
    Py_XDECREF(weight);
    Py_XDECREF(A);
    Py_XDECREF(B);
    Py_XDECREF(dx);
    Py_XDECREF(dA);
    Py_XDECREF(dB);
    return NULL;
}

/* ------------------------------------------------------------------ merge / unmerge */

static PyObject *merge_impl(const char *func, double sign, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"weight", "A", "B", "scale", "fan_in_fan_out", NULL};
    PyObject *w_o, *a_o, *b_o, *scale_o;
    int fan_in_fan_out = 0;
    PyArrayObject *weight = NULL, *A = NULL, *B = NULL;
    void *scratch = NULL;
    int type = -1;
    double scale;
    LoraDims dm;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$p", kwlist, &w_o, &a_o, &b_o, &scale_o,
                                     &fan_in_fan_out))
        return NULL;
    if (!(weight = get_array(func, "weight", w_o, &type, "weight", 1))) goto fail;
    if (!(A = get_array(func, "A", a_o, &type, "weight", 0))) goto fail;
    if (!(B = get_array(func, "B", b_o, &type, "weight", 0))) goto fail;
    if (check_ndim(func, "weight", weight, 2, 0) || check_ndim(func, "A", A, 2, 0) ||
        check_ndim(func, "B", B, 2, 0))
        goto fail;
    /* With fan_in_fan_out the weight is stored (d_in, d_out); A and B keep their shapes. */
    npy_intp d_in = PyArray_DIM(A, 1), d_out = PyArray_DIM(B, 0), r = PyArray_DIM(A, 0);
    if (check_blas_size(func, "A", "the rank r (A.shape[0])", r, 1) ||
        check_blas_size(func, "A", "d_in (A.shape[1])", d_in, 1) ||
        check_blas_size(func, "B", "d_out (B.shape[0])", d_out, 1))
        goto fail;
    npy_intp want_w[2] = {d_out, d_in}, want_wt[2] = {d_in, d_out}, want_b[2] = {d_out, r};
    if (fan_in_fan_out ? check_shape(func, "weight", weight, 2, want_wt,
                                     "(d_in, d_out) with fan_in_fan_out")
                       : check_shape(func, "weight", weight, 2, want_w, "(d_out, d_in)"))
        goto fail;
    if (check_shape(func, "B", B, 2, want_b, "(d_out, r)")) goto fail;
    if (get_real(func, "scale", scale_o, REAL_ANY, &scale)) goto fail;
    if (check_no_overlap(func, "weight", weight, "A", A) ||
        check_no_overlap(func, "weight", weight, "B", B))
        goto fail;
    if (as_carray(&A) || as_carray(&B)) goto fail;
    dm.d_out = d_out;
    dm.d_in = d_in;
    dm.r = r;
    if (fan_in_fan_out && !(scratch = take_scratch((size_t)(r * d_out), type))) goto fail;

    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        lora_merge_f32(PyArray_DATA(weight), scratch, PyArray_DATA(A), PyArray_DATA(B),
                       (float)(sign * scale), fan_in_fan_out, dm.d_out, dm.d_in, dm.r);
    else
        lora_merge_f64(PyArray_DATA(weight), scratch, PyArray_DATA(A), PyArray_DATA(B),
                       sign * scale, fan_in_fan_out, dm.d_out, dm.d_in, dm.r);
    Py_END_ALLOW_THREADS;

    give_scratch(scratch);
    Py_DECREF(A);
    Py_DECREF(B);
    return (PyObject *)weight;
fail:
    give_scratch(scratch);
    Py_XDECREF(weight);
    Py_XDECREF(A);
    Py_XDECREF(B);
    return NULL;
}

PyDoc_STRVAR(merge_doc,
"merge(weight, A, B, scale, *, fan_in_fan_out=False)\n--\n\n"
"Merge a LoRA update into the weight in place: ``weight += scale * B @ A``.\n\n"
"Parameters\n----------\n"
"weight : ndarray, shape (d_out, d_in), or (d_in, d_out) when fan_in_fan_out\n"
"    Updated in place: must be writeable, aligned and C-contiguous.\n"
"A : ndarray, shape (r, d_in)\n"
"B : ndarray, shape (d_out, r)\n"
"scale : float\n"
"fan_in_fan_out : bool\n    The weight is stored transposed (GPT-2 Conv1D); the update is too.\n\n"
"Returns\n-------\nweight : the same array, updated.");

static PyObject *merge(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return merge_impl("merge", 1.0, args, kwds);
}

PyDoc_STRVAR(unmerge_doc,
"unmerge(weight, A, B, scale, *, fan_in_fan_out=False)\n--\n\n"
"Undo merge in place: ``weight -= scale * B @ A``. Arguments as for merge.\n\n"
"Returns\n-------\nweight : the same array, updated.");

static PyObject *unmerge(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return merge_impl("unmerge", -1.0, args, kwds);
}

/* ------------------------------------------------------------------ dense forward/backward */

PyDoc_STRVAR(dense_forward_doc,
"dense_forward(x, weight, bias=None, *, fan_in_fan_out=False, residual=None)\n--\n\n"
"A plain linear layer: ``y = x @ weight.T + bias (+ residual)`` (``x @ weight + ...``\n"
"when fan_in_fan_out: weight stored (d_in, d_out), as GPT-2's Conv1D, read in place).\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d_in)\nweight : ndarray, shape (d_out, d_in) or (d_in, d_out)\n"
"bias : ndarray, shape (d_out,), optional\nfan_in_fan_out : bool\n"
"residual : ndarray, shape (..., d_out), optional\n"
"    Added to y in the pass that writes the bias (no extra pass over memory).\n\n"
"Returns\n-------\ny : ndarray, shape (..., d_out)");

static PyObject *dense_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "dense_forward";
    static char *kwlist[] = {"x", "weight", "bias", "fan_in_fan_out", "residual", NULL};
    PyObject *x_o, *w_o, *bias_o = Py_None, *res_o = Py_None;
    PyArrayObject *x = NULL, *weight = NULL, *bias = NULL, *res = NULL, *y = NULL;
    PackedWeight *packed = NULL;
    LoraPacked pk_args = {NULL, NULL, 0};
    const LoraPacked *pk = NULL;
    int type = -1, wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$pO:dense_forward", kwlist, &x_o, &w_o,
                                     &bias_o, &wt, &res_o))
        return NULL;
    if (!(x = get_array(func, "x", x_o, &type, "x", 0))) goto fail;
    npy_intp d_out, d_in;
    if (get_weight(func, w_o, &type, "x", wt, 0, &weight, &packed, &d_out, &d_in)) goto fail;
    if (bias_o != Py_None && !(bias = get_array(func, "bias", bias_o, &type, "x", 0))) goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    if (check_rows_like(func, "x", x, x, d_in, "(..., d_in)")) goto fail;
    npy_intp n = leading_rows(x);
    if (check_blas_size(func, "x", "the number of rows of x", n, 0)) goto fail;
    if (bias && check_shape(func, "bias", bias, 1, &d_out, "(d_out,)")) goto fail;
    if (!(res = get_residual(func, res_o, &type, x, d_out)) && PyErr_Occurred()) goto fail;
    if (as_carray(&x) || as_carray(&weight) || as_carray(&bias) || as_carray(&res)) goto fail;
    if (!(y = new_like_rows(x, d_out, type))) goto fail;
    if (packed_args(packed, 0, type, n, &pk_args, &pk)) goto fail;
    const void *w_p = weight ? PyArray_DATA(weight) : NULL;

    const void *bias_p = bias ? PyArray_DATA(bias) : NULL, *res_p = res ? PyArray_DATA(res) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        dense_forward_f32(PyArray_DATA(y), PyArray_DATA(x), w_p, bias_p, res_p, n, d_in, d_out,
                          wt, pk);
    else
        dense_forward_f64(PyArray_DATA(y), PyArray_DATA(x), w_p, bias_p, res_p, n, d_in, d_out,
                          wt, pk);
    Py_END_ALLOW_THREADS;
    give_scratch(pk_args.xp);
    Py_DECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_XDECREF(bias);
    Py_XDECREF(res);
    return (PyObject *)y;
fail:
    give_scratch(pk_args.xp);
    Py_XDECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_XDECREF(bias);
    Py_XDECREF(res);
    Py_XDECREF(y);
    return NULL;
}

PyDoc_STRVAR(dense_backward_doc,
"dense_backward(dy, x, weight, *, need_dx=True, need_dweight=True, fan_in_fan_out=False,\n"
"               add_dx_to=None)\n--\n\n"
"Backward of dense_forward: ``dx = dy @ weight``, ``dweight = dy.T @ x`` (rows of the\n"
"leading dims flattened; with fan_in_fan_out ``dx = dy @ weight.T``, ``dweight = x.T @ dy``).\n"
"The bias gradient is ``dy`` summed over rows, left to the caller. With ``add_dx_to``\n"
"(shape (..., d_in), writeable, C-contiguous, sharing no memory with the inputs) dx is\n"
"added to that array in place, which is returned as dx.\n\n"
"Returns\n-------\n"
"dx : ndarray, shape (..., d_in), or None when need_dx is False\n"
"dweight : ndarray, weight's shape, or None when need_dweight is False");

static PyObject *dense_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "dense_backward";
    static char *kwlist[] = {"dy",           "x",              "weight",    "need_dx",
                             "need_dweight", "fan_in_fan_out", "add_dx_to", NULL};
    PyObject *dy_o, *x_o, *w_o, *acc_o = Py_None;
    int need_dx = 1, need_dw = 1, wt = 0;
    PyArrayObject *dy = NULL, *x = NULL, *weight = NULL, *dx = NULL, *dW = NULL;
    PackedWeight *packed = NULL;
    LoraPacked pk_args = {NULL, NULL, 0};
    const LoraPacked *pk = NULL;
    int type = -1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$pppO:dense_backward", kwlist, &dy_o, &x_o,
                                     &w_o, &need_dx, &need_dw, &wt, &acc_o))
        return NULL;
    if (!(dy = get_array(func, "dy", dy_o, &type, "dy", 0))) goto fail;
    if (!(x = get_array(func, "x", x_o, &type, "dy", 0))) goto fail;
    npy_intp d_out, d_in;
    if (get_weight(func, w_o, &type, "dy", wt, need_dx ? 1 : -1, &weight, &packed, &d_out,
                   &d_in))
        goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    if (check_rows_like(func, "x", x, x, d_in, "(..., d_in)")) goto fail;
    if (check_rows_like(func, "dy", dy, x, d_out, "(..., d_out) with the leading dims of x"))
        goto fail;
    npy_intp n = leading_rows(x);
    if (check_blas_size(func, "x", "the number of rows of x", n, 0)) goto fail;
    PyArrayObject *inputs[] = {dy, x, weight};
    const char *names[] = {"dy", "x", "weight"};
    if (!(dx = get_add_dx_to(func, acc_o, need_dx, &type, x, d_in, inputs, names,
                             weight ? 3 : 2)) &&
        PyErr_Occurred())
        goto fail;
    const int acc = dx != NULL;
    if (as_carray(&dy) || as_carray(&x) || as_carray(&weight)) goto fail;
    if (need_dx && !dx && !(dx = new_like_rows(x, d_in, type))) goto fail;
    npy_intp w_dims[2] = {wt ? d_in : d_out, wt ? d_out : d_in}; /* weight's own layout */
    if (need_dw && !(dW = (PyArrayObject *)PyArray_SimpleNew(2, w_dims, type))) goto fail;
    if (packed_args(packed, need_dx ? 1 : -1, type, n, &pk_args, &pk)) goto fail;
    const void *w_p = weight ? PyArray_DATA(weight) : NULL;

    void *dx_p = dx ? PyArray_DATA(dx) : NULL, *dw_p = dW ? PyArray_DATA(dW) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        dense_backward_f32(dx_p, dw_p, PyArray_DATA(dy), PyArray_DATA(x), w_p, n, d_in, d_out,
                           wt, acc, pk);
    else
        dense_backward_f64(dx_p, dw_p, PyArray_DATA(dy), PyArray_DATA(x), w_p, n, d_in, d_out,
                           wt, acc, pk);
    Py_END_ALLOW_THREADS;
    give_scratch(pk_args.xp);
    Py_DECREF(dy);
    Py_DECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    return Py_BuildValue("(NN)", dx ? (PyObject *)dx : Py_NewRef(Py_None),
                         dW ? (PyObject *)dW : Py_NewRef(Py_None));
fail:
    give_scratch(pk_args.xp);
    Py_XDECREF(dy);
    Py_XDECREF(x);
    Py_XDECREF(weight);
    Py_XDECREF(packed);
    Py_XDECREF(dx);
    Py_XDECREF(dW);
    return NULL;
}

/* ------------------------------------------------------------------ GELU */

PyDoc_STRVAR(gelu_forward_doc,
"gelu_forward(x)\n--\n\n"
"Exact GELU, ``x * Phi(x)`` with Phi the standard normal CDF, as\n"
"``torch.nn.GELU(approximate='none')``. float32 evaluates Phi to 1.2e-7 absolute with a\n"
"vectorised approximation; float64 uses erf.\n\n"
"Parameters\n----------\nx : ndarray, float32 or float64, any shape\n\n"
"Returns\n-------\ny : ndarray, the shape and dtype of x");

static PyObject *gelu_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "gelu_forward";
    static char *kwlist[] = {"x", NULL};
    PyObject *x_o;
    PyArrayObject *x = NULL, *y = NULL;
    int type = -1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:gelu_forward", kwlist, &x_o)) return NULL;
    if (!(x = get_array(func, "x", x_o, &type, "x", 0)) || as_carray(&x)) goto fail;
    if (!(y = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), type)))
        goto fail;
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        gelu_forward_f32(PyArray_DATA(y), PyArray_DATA(x), n);
    else
        gelu_forward_f64(PyArray_DATA(y), PyArray_DATA(x), n);
    Py_END_ALLOW_THREADS;
    Py_DECREF(x);
    return (PyObject *)y;
fail:
    Py_XDECREF(x);
    return NULL;
}

PyDoc_STRVAR(gelu_backward_doc,
"gelu_backward(dy, x)\n--\n\n"
"Backward of gelu_forward: ``dx = dy * (Phi(x) + x * phi(x))``.\n\n"
"Parameters\n----------\ndy : ndarray\nx : ndarray, the shape and dtype of dy\n\n"
"Returns\n-------\ndx : ndarray, the shape and dtype of x");

static PyObject *gelu_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "gelu_backward";
    static char *kwlist[] = {"dy", "x", NULL};
    PyObject *dy_o, *x_o;
    PyArrayObject *dy = NULL, *x = NULL, *dx = NULL;
    int type = -1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:gelu_backward", kwlist, &dy_o, &x_o))
        return NULL;
    if (!(dy = get_array(func, "dy", dy_o, &type, "dy", 0))) goto fail;
    if (!(x = get_array(func, "x", x_o, &type, "dy", 0))) goto fail;
    if (check_shape(func, "x", x, PyArray_NDIM(dy), PyArray_DIMS(dy), "dy.shape")) goto fail;
    if (as_carray(&dy) || as_carray(&x)) goto fail;
    if (!(dx = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), type)))
        goto fail;
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        gelu_backward_f32(PyArray_DATA(dx), PyArray_DATA(dy), PyArray_DATA(x), n);
    else
        gelu_backward_f64(PyArray_DATA(dx), PyArray_DATA(dy), PyArray_DATA(x), n);
    Py_END_ALLOW_THREADS;
    Py_DECREF(dy);
    Py_DECREF(x);
    return (PyObject *)dx;
fail:
    Py_XDECREF(dy);
    Py_XDECREF(x);
    return NULL;
}

/* ------------------------------------------------------------------ LayerNorm */

PyDoc_STRVAR(layer_norm_forward_doc,
"layer_norm_forward(x, weight, bias=None, *, eps=1e-5)\n--\n\n"
"LayerNorm over the last axis, as torch.nn.LayerNorm (biased variance, eps inside the root):\n"
"``y = (x - mean) / sqrt(var + eps) * weight + bias``.\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d)\nweight : ndarray, shape (d,)\nbias : ndarray, shape (d,), optional\n"
"eps : float >= 0\n\n"
"Returns\n-------\n"
"y : ndarray, shape (..., d)\nmean, rstd : ndarray, shape (...,)\n"
"    Row means and 1 / sqrt(var + eps), kept for layer_norm_backward.");

static PyObject *layer_norm_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "layer_norm_forward";
    static char *kwlist[] = {"x", "weight", "bias", "eps", NULL};
    PyObject *x_o, *w_o, *b_o = Py_None, *eps_o = NULL;
    PyArrayObject *x = NULL, *w = NULL, *b = NULL, *y = NULL, *mean = NULL, *rstd = NULL;
    int type = -1;
    double eps = 1e-5;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$O:layer_norm_forward", kwlist, &x_o, &w_o,
                                     &b_o, &eps_o))
        return NULL;
    if (!(x = get_array(func, "x", x_o, &type, "x", 0))) goto fail;
    if (!(w = get_array(func, "weight", w_o, &type, "x", 0))) goto fail;
    if (b_o != Py_None && !(b = get_array(func, "bias", b_o, &type, "x", 0))) goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    npy_intp d = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (check_blas_size(func, "x", "the last dimension d", d, 1)) goto fail;
    if (check_shape(func, "weight", w, 1, &d, "(d,)")) goto fail;
    if (b && check_shape(func, "bias", b, 1, &d, "(d,)")) goto fail;
    if (eps_o && get_real(func, "eps", eps_o, REAL_NONNEG, &eps)) goto fail;
    if (as_carray(&x) || as_carray(&w) || as_carray(&b)) goto fail;
    npy_intp rows = leading_rows(x);
    if (!(y = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), type)))
        goto fail;
    if (!(mean = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x) - 1, PyArray_DIMS(x), type)))
        goto fail;
    if (!(rstd = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x) - 1, PyArray_DIMS(x), type)))
        goto fail;
    const void *b_p = b ? PyArray_DATA(b) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        layer_norm_forward_f32(PyArray_DATA(y), PyArray_DATA(mean), PyArray_DATA(rstd),
                               PyArray_DATA(x), PyArray_DATA(w), b_p, eps, rows, d);
    else
        layer_norm_forward_f64(PyArray_DATA(y), PyArray_DATA(mean), PyArray_DATA(rstd),
                               PyArray_DATA(x), PyArray_DATA(w), b_p, eps, rows, d);
    Py_END_ALLOW_THREADS;
    Py_DECREF(x);
    Py_DECREF(w);
    Py_XDECREF(b);
    return Py_BuildValue("(NNN)", y, mean, rstd);
fail:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    Py_XDECREF(y);
    Py_XDECREF(mean);
    Py_XDECREF(rstd);
    return NULL;
}

PyDoc_STRVAR(layer_norm_backward_doc,
"layer_norm_backward(dy, x, mean, rstd, weight, *, need_dweight=True, need_dbias=True)\n--\n\n"
"Backward of layer_norm_forward.\n\n"
"Returns\n-------\n"
"dx : ndarray, shape (..., d)\n"
"dweight, dbias : ndarray, shape (d,), or None when not asked for");

static PyObject *layer_norm_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "layer_norm_backward";
    static char *kwlist[] = {"dy", "x", "mean", "rstd", "weight", "need_dweight", "need_dbias",
                             NULL};
    PyObject *dy_o, *x_o, *mean_o, *rstd_o, *w_o;
    int need_dw = 1, need_db = 1;
    PyArrayObject *dy = NULL, *x = NULL, *mean = NULL, *rstd = NULL, *w = NULL;
    PyArrayObject *dx = NULL, *dw = NULL, *db = NULL;
    int type = -1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|$pp:layer_norm_backward", kwlist, &dy_o,
                                     &x_o, &mean_o, &rstd_o, &w_o, &need_dw, &need_db))
        return NULL;
    if (!(dy = get_array(func, "dy", dy_o, &type, "dy", 0))) goto fail;
    if (!(x = get_array(func, "x", x_o, &type, "dy", 0))) goto fail;
    if (!(mean = get_array(func, "mean", mean_o, &type, "dy", 0))) goto fail;
    if (!(rstd = get_array(func, "rstd", rstd_o, &type, "dy", 0))) goto fail;
    if (!(w = get_array(func, "weight", w_o, &type, "dy", 0))) goto fail;
    if (check_ndim(func, "x", x, 1, 1)) goto fail;
    int nd = PyArray_NDIM(x);
    npy_intp d = PyArray_DIM(x, nd - 1);
    if (check_blas_size(func, "x", "the last dimension d", d, 1)) goto fail;
    if (check_shape(func, "dy", dy, nd, PyArray_DIMS(x), "x.shape") ||
        check_shape(func, "mean", mean, nd - 1, PyArray_DIMS(x), "x.shape[:-1]") ||
        check_shape(func, "rstd", rstd, nd - 1, PyArray_DIMS(x), "x.shape[:-1]") ||
        check_shape(func, "weight", w, 1, &d, "(d,)"))
        goto fail;
    if (as_carray(&dy) || as_carray(&x) || as_carray(&mean) || as_carray(&rstd) || as_carray(&w))
        goto fail;
    npy_intp rows = leading_rows(x);
    if (!(dx = (PyArrayObject *)PyArray_SimpleNew(nd, PyArray_DIMS(x), type))) goto fail;
    if (need_dw && !(dw = (PyArrayObject *)PyArray_ZEROS(1, &d, type, 0))) goto fail;
    if (need_db && !(db = (PyArrayObject *)PyArray_ZEROS(1, &d, type, 0))) goto fail;
    void *dw_p = dw ? PyArray_DATA(dw) : NULL, *db_p = db ? PyArray_DATA(db) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        layer_norm_backward_f32(PyArray_DATA(dx), dw_p, db_p, PyArray_DATA(dy), PyArray_DATA(x),
                                PyArray_DATA(mean), PyArray_DATA(rstd), PyArray_DATA(w), rows, d);
    else
        layer_norm_backward_f64(PyArray_DATA(dx), dw_p, db_p, PyArray_DATA(dy), PyArray_DATA(x),
                                PyArray_DATA(mean), PyArray_DATA(rstd), PyArray_DATA(w), rows, d);
    Py_END_ALLOW_THREADS;
    Py_DECREF(dy);
    Py_DECREF(x);
    Py_DECREF(mean);
    Py_DECREF(rstd);
    Py_DECREF(w);
    return Py_BuildValue("(NNN)", dx, dw ? (PyObject *)dw : Py_NewRef(Py_None),
                         db ? (PyObject *)db : Py_NewRef(Py_None));
fail:
    Py_XDECREF(dy);
    Py_XDECREF(x);
    Py_XDECREF(mean);
    Py_XDECREF(rstd);
    Py_XDECREF(w);
    Py_XDECREF(dx);
    Py_XDECREF(dw);
    Py_XDECREF(db);
    return NULL;
}

/* ------------------------------------------------------------------ adam_step */

/* ------------------------------------------------------------------ attention */

/* The shared arguments of attention_forward/backward: q (batch, seq_q, hidden), k and v
 * (batch, seq_k, hidden), num_heads dividing hidden, the key mask (None, or bool/integer
 * (batch, seq_k), converted to a C bool array in *mask), scale (default 1/sqrt(head_dim)),
 * dropout and seed. Fills *d. */
static int attention_args(const char *func, PyArrayObject *q, PyArrayObject *k, PyArrayObject *v,
                          PyObject *heads_o, PyObject *mask_o, PyObject *scale_o,
                          PyObject *drop_o, PyObject *seed_o, LoraAttnDims *d,
                          PyArrayObject **mask, double *scale, double *p, uint64_t *seed) {
    if (check_ndim(func, "q", q, 3, 0) || check_ndim(func, "k", k, 3, 0)) return -1;
    npy_intp batch = PyArray_DIM(q, 0), seq_q = PyArray_DIM(q, 1), hidden = PyArray_DIM(q, 2);
    npy_intp seq_k = PyArray_DIM(k, 1);
    npy_intp want_k[3] = {batch, seq_k, hidden};
    if (check_shape(func, "k", k, 3, want_k, "(batch, seq_k, hidden)") ||
        check_shape(func, "v", v, 3, want_k, "(batch, seq_k, hidden) = k.shape"))
        return -1;
    if (check_blas_size(func, "q", "hidden (q.shape[2])", hidden, 1) ||
        check_blas_size(func, "q", "seq_q (q.shape[1])", seq_q, 0) ||
        check_blas_size(func, "k", "seq_k (k.shape[1])", seq_k, 1))
        return -1;
    if (!PyLong_Check(heads_o)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument 'num_heads' must be an int, got %s",
                     func, Py_TYPE(heads_o)->tp_name);
        return -1;
    }
    long heads = PyLong_AsLong(heads_o);
    if (heads == -1 && PyErr_Occurred()) PyErr_Clear();
    if (heads < 1 || heads > hidden || hidden % heads) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'num_heads' must be a positive divisor of hidden "
                            "(q.shape[2] = %" NPY_INTP_FMT "), got %R",
                     func, hidden, heads_o);
        return -1;
    }
    *d = (LoraAttnDims){(size_t)batch, (size_t)seq_q, (size_t)seq_k, (size_t)heads,
                        (size_t)(hidden / heads)};
    /* probs and the backward's scratch hold batch*heads*seq_q*seq_k values */
    npy_intp probs = 0;
    if (__builtin_mul_overflow(batch, (npy_intp)heads, &probs) ||
        __builtin_mul_overflow(probs, seq_q, &probs) ||
        __builtin_mul_overflow(probs, seq_k, &probs) || probs > NPY_MAX_INTP / 16) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: batch * num_heads * seq_q * seq_k attention probabilities do "
                            "not fit in memory",
                     func);
        return -1;
    }
    if (mask_o != Py_None) {
        if (!PyArray_Check(mask_o) ||
            !(PyArray_ISBOOL((PyArrayObject *)mask_o) || PyArray_ISINTEGER((PyArrayObject *)mask_o))) {
            PyErr_Format(PyExc_TypeError,
                         PREFIX "%s: argument 'key_mask' must be None or a numpy.ndarray of "
                                "bool or integer dtype, got %s",
                         func, PyArray_Check(mask_o) ? "an array of another dtype"
                                                    : Py_TYPE(mask_o)->tp_name);
            return -1;
        }
        npy_intp want_m[2] = {batch, seq_k};
        if (check_shape(func, "key_mask", (PyArrayObject *)mask_o, 2, want_m, "(batch, seq_k)"))
            return -1;
    }
    *scale = 1.0 / sqrt((double)d->head_dim);
    if (scale_o && scale_o != Py_None && get_real(func, "scale", scale_o, REAL_ANY, scale))
        return -1;
    *p = 0.0;
    if (drop_o && get_real(func, "dropout", drop_o, REAL_UNIT, p)) return -1;
    if (get_seed(func, seed_o, *p, seed)) return -1;
    if (mask_o != Py_None &&
        !(*mask = (PyArrayObject *)PyArray_FromAny(mask_o, PyArray_DescrFromType(NPY_BOOL), 2, 2,
                                                   NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST,
                                                   NULL)))
        return -1;
    return 0;
}

PyDoc_STRVAR(attention_forward_doc,
"attention_forward(q, k, v, num_heads, *, key_mask=None, scale=None, dropout=0.0, seed=None)\n"
"--\n\n"
"Multi-head scaled dot-product attention on the layout Linear projections write:\n"
"``P = softmax(scale * q_h k_h^T + mask)``, ``ctx_h = dropout(P) v_h`` for each head h, the\n"
"column block ``[h*head_dim, (h+1)*head_dim)``.\n\n"
"Parameters\n----------\n"
"q : ndarray, shape (batch, seq_q, hidden)\n"
"k, v : ndarray, shape (batch, seq_k, hidden)\n"
"num_heads : int, divides hidden\n"
"key_mask : ndarray of bool or int, shape (batch, seq_k), optional\n"
"    Nonzero where a query may attend to the key. Masked keys get probability 0; an item\n"
"    with no key at all attends to every key equally (as an additive mask of the most\n"
"    negative float does). A right-padded mask (ones, then zeros) skips the padded keys'\n"
"    work entirely.\n"
"scale : float, default 1 / sqrt(head_dim)\n"
"dropout : float in [0, 1)\n    Dropout on the probabilities, its mask drawn from seed.\n"
"seed : int in [0, 2**64), required when dropout > 0\n\n"
"Returns\n-------\n"
"ctx : ndarray, shape (batch, seq_q, hidden)\n"
"probs : ndarray, shape (batch, num_heads, seq_q, seq_k)\n"
"    The softmax probabilities before dropout, kept for attention_backward.");

static PyObject *attention_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "attention_forward";
    static char *kwlist[] = {"q", "k", "v", "num_heads", "key_mask", "scale", "dropout", "seed",
                             NULL};
    PyObject *q_o, *k_o, *v_o, *heads_o, *mask_o = Py_None, *scale_o = NULL, *drop_o = NULL,
                                         *seed_o = NULL;
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *mask = NULL, *ctx = NULL, *probs = NULL;
    void *scratch = NULL;
    int type = -1;
    LoraAttnDims d;
    double scale, p;
    uint64_t seed;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$OOOO:attention_forward", kwlist, &q_o,
                                     &k_o, &v_o, &heads_o, &mask_o, &scale_o, &drop_o, &seed_o))
        return NULL;
    if (!(q = get_array(func, "q", q_o, &type, "q", 0))) goto fail;
    if (!(k = get_array(func, "k", k_o, &type, "q", 0))) goto fail;
    if (!(v = get_array(func, "v", v_o, &type, "q", 0))) goto fail;
    if (attention_args(func, q, k, v, heads_o, mask_o, scale_o, drop_o, seed_o, &d, &mask,
                       &scale, &p, &seed))
        goto fail;
    if (as_carray(&q) || as_carray(&k) || as_carray(&v)) goto fail;
    npy_intp pdims[4] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq_q,
                         (npy_intp)d.seq_k};
    if (!(ctx = (PyArrayObject *)PyArray_SimpleNew(3, PyArray_DIMS(q), type))) goto fail;
    if (!(probs = (PyArrayObject *)PyArray_SimpleNew(4, pdims, type))) goto fail;
    const size_t parts = lora_attention_parts(&d), elem = PyArray_ITEMSIZE(q);
    if (!(scratch = take_bytes(lora_attention_scratch_bytes(&d, elem, parts)))) goto fail;
    const unsigned char *m = mask ? PyArray_DATA(mask) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        attention_forward_f32(PyArray_DATA(ctx), PyArray_DATA(probs), scratch, PyArray_DATA(q),
                              PyArray_DATA(k), PyArray_DATA(v), m, (float)scale, p, seed, &d,
                              parts);
    else
        attention_forward_f64(PyArray_DATA(ctx), PyArray_DATA(probs), scratch, PyArray_DATA(q),
                              PyArray_DATA(k), PyArray_DATA(v), m, scale, p, seed, &d, parts);
    Py_END_ALLOW_THREADS;
    give_scratch(scratch);
    Py_DECREF(q);
    Py_DECREF(k);
    Py_DECREF(v);
    Py_XDECREF(mask);
    return Py_BuildValue("(NN)", ctx, probs);
fail:
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(mask);
    Py_XDECREF(ctx);
    Py_XDECREF(probs);
    return NULL;
}

PyDoc_STRVAR(attention_backward_doc,
"attention_backward(dctx, q, k, v, probs, num_heads, *, key_mask=None, scale=None, "
"dropout=0.0, seed=None)\n--\n\n"
"Backward of attention_forward, with the same q, k, v, key_mask, scale, dropout and seed and\n"
"its probs: ``dv = dropout(P)^T dctx``, ``dS = P (dP - rowsum(P dP))`` with\n"
"``dP = dropout'(dctx v^T)``, ``dq = scale dS k``, ``dk = scale dS^T q`` per head.\n\n"
"Parameters\n----------\n"
"dctx : ndarray, shape (batch, seq_q, hidden)\n"
"q, k, v, num_heads, key_mask, scale, dropout, seed : as attention_forward\n"
"probs : ndarray, shape (batch, num_heads, seq_q, seq_k), from attention_forward\n\n"
"Returns\n-------\n"
"dq : ndarray, shape (batch, seq_q, hidden)\n"
"dk, dv : ndarray, shape (batch, seq_k, hidden)");

static PyObject *attention_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "attention_backward";
    static char *kwlist[] = {"dctx", "q", "k", "v", "probs", "num_heads", "key_mask", "scale",
                             "dropout", "seed", NULL};
    PyObject *dctx_o, *q_o, *k_o, *v_o, *probs_o, *heads_o, *mask_o = Py_None, *scale_o = NULL,
                                                           *drop_o = NULL, *seed_o = NULL;
    PyArrayObject *dctx = NULL, *q = NULL, *k = NULL, *v = NULL, *probs = NULL, *mask = NULL,
                  *dq = NULL, *dk = NULL, *dv = NULL;
    void *scratch = NULL;
    int type = -1;
    LoraAttnDims d;
    double scale, p;
    uint64_t seed;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|$OOOO:attention_backward", kwlist,
                                     &dctx_o, &q_o, &k_o, &v_o, &probs_o, &heads_o, &mask_o,
                                     &scale_o, &drop_o, &seed_o))
        return NULL;
    if (!(dctx = get_array(func, "dctx", dctx_o, &type, "dctx", 0))) goto fail;
    if (!(q = get_array(func, "q", q_o, &type, "dctx", 0))) goto fail;
    if (!(k = get_array(func, "k", k_o, &type, "dctx", 0))) goto fail;
    if (!(v = get_array(func, "v", v_o, &type, "dctx", 0))) goto fail;
    if (!(probs = get_array(func, "probs", probs_o, &type, "dctx", 0))) goto fail;
    if (attention_args(func, q, k, v, heads_o, mask_o, scale_o, drop_o, seed_o, &d, &mask,
                       &scale, &p, &seed))
        goto fail;
    npy_intp pdims[4] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq_q,
                         (npy_intp)d.seq_k};
    if (check_shape(func, "dctx", dctx, 3, PyArray_DIMS(q), "q.shape") ||
        check_shape(func, "probs", probs, 4, pdims, "(batch, num_heads, seq_q, seq_k)"))
        goto fail;
    if (as_carray(&dctx) || as_carray(&q) || as_carray(&k) || as_carray(&v) || as_carray(&probs))
        goto fail;
    if (!(dq = (PyArrayObject *)PyArray_SimpleNew(3, PyArray_DIMS(q), type))) goto fail;
    if (!(dk = (PyArrayObject *)PyArray_SimpleNew(3, PyArray_DIMS(k), type))) goto fail;
    if (!(dv = (PyArrayObject *)PyArray_SimpleNew(3, PyArray_DIMS(k), type))) goto fail;
    const size_t parts = lora_attention_parts(&d), elem = PyArray_ITEMSIZE(q);
    if (!(scratch = take_bytes(lora_attention_scratch_bytes(&d, elem, parts)))) goto fail;
    const unsigned char *m = mask ? PyArray_DATA(mask) : NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        attention_backward_f32(PyArray_DATA(dq), PyArray_DATA(dk), PyArray_DATA(dv), scratch,
                               PyArray_DATA(dctx), PyArray_DATA(q), PyArray_DATA(k),
                               PyArray_DATA(v), PyArray_DATA(probs), m, (float)scale, p, seed,
                               &d, parts);
    else
        attention_backward_f64(PyArray_DATA(dq), PyArray_DATA(dk), PyArray_DATA(dv), scratch,
                               PyArray_DATA(dctx), PyArray_DATA(q), PyArray_DATA(k),
                               PyArray_DATA(v), PyArray_DATA(probs), m, scale, p, seed, &d,
                               parts);
    Py_END_ALLOW_THREADS;
    give_scratch(scratch);
    Py_DECREF(dctx);
    Py_DECREF(q);
    Py_DECREF(k);
    Py_DECREF(v);
    Py_DECREF(probs);
    Py_XDECREF(mask);
    return Py_BuildValue("(NNN)", dq, dk, dv);
fail:
    Py_XDECREF(dctx);
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(probs);
    Py_XDECREF(mask);
    Py_XDECREF(dq);
    Py_XDECREF(dk);
    Py_XDECREF(dv);
    return NULL;
}

PyDoc_STRVAR(adam_step_doc,
"adam_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,\n"
"          weight_decay=0.0, decoupled=True)\n--\n\n"
"One Adam (decoupled=False) or AdamW (decoupled=True) step, in place on param, m and v,\n"
"exactly the update of torch.optim.Adam / torch.optim.AdamW.\n\n"
"Parameters\n----------\n"
"param, m, v : ndarray, one shape and dtype\n"
"    Updated in place: must be writeable, aligned, C-contiguous and separate arrays.\n"
"grad : ndarray, the shape and dtype of param\n    Read only (Adam's L2 term is not written into it).\n"
"step : int >= 1\n    The step number after this update (1 on the first call).\n"
"lr, eps, weight_decay : float >= 0\n"
"beta1, beta2 : float in [0, 1)\n"
"decoupled : bool\n    True for AdamW's decoupled weight decay, False for Adam's L2 term.\n\n"
"Returns\n-------\nNone");

static PyObject *adam_step(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "adam_step";
    static char *kwlist[] = {"param", "grad",  "m",   "v",            "step",      "lr",
                             "beta1", "beta2", "eps", "weight_decay", "decoupled", NULL};
    PyObject *p_o, *g_o, *m_o, *v_o, *step_o = NULL, *lr_o = NULL;
    PyObject *b1_o = NULL, *b2_o = NULL, *eps_o = NULL, *wd_o = NULL;
    int decoupled = 1;
    PyArrayObject *param = NULL, *grad = NULL, *m = NULL, *v = NULL;
    int type = -1;
    double lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0;
    long long step;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$OOOOOOp:adam_step", kwlist, &p_o, &g_o,
                                     &m_o, &v_o, &step_o, &lr_o, &b1_o, &b2_o, &eps_o, &wd_o,
                                     &decoupled))
        return NULL;
    if (!step_o || !lr_o) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: keyword arguments 'step' and 'lr' are required",
                     func);
        return NULL;
    }
    if (!(param = get_array(func, "param", p_o, &type, "param", 1))) goto fail;
    if (!(grad = get_array(func, "grad", g_o, &type, "param", 0))) goto fail;
    if (!(m = get_array(func, "m", m_o, &type, "param", 1))) goto fail;
    if (!(v = get_array(func, "v", v_o, &type, "param", 1))) goto fail;
    const char *what = "param.shape";
    if (check_shape(func, "grad", grad, PyArray_NDIM(param), PyArray_DIMS(param), what) ||
        check_shape(func, "m", m, PyArray_NDIM(param), PyArray_DIMS(param), what) ||
        check_shape(func, "v", v, PyArray_NDIM(param), PyArray_DIMS(param), what))
        goto fail;
    if (check_no_overlap(func, "param", param, "m", m) ||
        check_no_overlap(func, "param", param, "v", v) ||
        check_no_overlap(func, "m", m, "v", v) ||
        check_no_overlap(func, "param", param, "grad", grad) ||
        check_no_overlap(func, "m", m, "grad", grad) || check_no_overlap(func, "v", v, "grad", grad))
        goto fail;
    if (!PyLong_Check(step_o)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument 'step' must be an int, got %s", func,
                     Py_TYPE(step_o)->tp_name);
        goto fail;
    }
    step = PyLong_AsLongLong(step_o);
    if (step == -1 && PyErr_Occurred()) goto fail;
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, PREFIX "%s: argument 'step' must be >= 1, got %lld", func,
                     step);
        goto fail;
    }
    if (get_real(func, "lr", lr_o, REAL_NONNEG, &lr) ||
        (b1_o && get_real(func, "beta1", b1_o, REAL_UNIT, &beta1)) ||
        (b2_o && get_real(func, "beta2", b2_o, REAL_UNIT, &beta2)) ||
        (eps_o && get_real(func, "eps", eps_o, REAL_NONNEG, &eps)) ||
        (wd_o && get_real(func, "weight_decay", wd_o, REAL_NONNEG, &wd)))
        goto fail;
    if (as_carray(&grad)) goto fail;

    size_t numel = (size_t)PyArray_SIZE(param);
    Py_BEGIN_ALLOW_THREADS;
    if (type == NPY_FLOAT32)
        adam_step_f32(PyArray_DATA(param), PyArray_DATA(m), PyArray_DATA(v), PyArray_DATA(grad),
                      numel, step, lr, beta1, beta2, eps, wd, decoupled);
    else
        adam_step_f64(PyArray_DATA(param), PyArray_DATA(m), PyArray_DATA(v), PyArray_DATA(grad),
                      numel, step, lr, beta1, beta2, eps, wd, decoupled);
    Py_END_ALLOW_THREADS;
    Py_DECREF(param);
    Py_DECREF(grad);
    Py_DECREF(m);
    Py_DECREF(v);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(param);
    Py_XDECREF(grad);
    Py_XDECREF(m);
    Py_XDECREF(v);
    return NULL;
}

/* ------------------------------------------------------------------ BLAS threads and info */

PyDoc_STRVAR(set_num_threads_doc,
"set_num_threads(n)\n--\n\nSet the number of threads of the OpenBLAS that lora links.");

static PyObject *set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "lora.set_num_threads: argument 'n' must be in [1, 4096], "
                                       "got %ld", n);
        return NULL;
    }
    CBLAS_FUNC(openblas_set_num_threads)((int)n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(blas_info_doc,
"blas_info()\n--\n\nThe linked OpenBLAS: a dict with 'corename' (the kernel it runs),\n"
"'config' and 'num_threads'.");

static PyObject *blas_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:s,s:i}", "corename", CBLAS_FUNC(openblas_get_corename)(),
                         "config", CBLAS_FUNC(openblas_get_config)(), "num_threads",
                         CBLAS_FUNC(openblas_get_num_threads)());
}

/* ------------------------------------------------------------------ module */

/* A function taking keyword arguments, with its docstring NAME_doc. */
#define KW_METHOD(name)                                                                      \
    {#name, (PyCFunction)(void (*)(void))name, METH_VARARGS | METH_KEYWORDS, name##_doc}

static PyMethodDef methods[] = {
    KW_METHOD(linear_forward),
    KW_METHOD(linear_backward),
    KW_METHOD(merge),
    KW_METHOD(unmerge),
    KW_METHOD(dense_forward),
    KW_METHOD(dense_backward),
    KW_METHOD(adam_step),
    KW_METHOD(layer_norm_forward),
    KW_METHOD(layer_norm_backward),
    KW_METHOD(gelu_forward),
    KW_METHOD(gelu_backward),
    KW_METHOD(attention_forward),
    KW_METHOD(attention_backward),
    {"set_num_threads", set_num_threads, METH_O, set_num_threads_doc},
    {"blas_info", blas_info, METH_NOARGS, blas_info_doc},
    {NULL, NULL, 0, NULL}};

#undef KW_METHOD

static int exec_module(PyObject *module) {
    import_array1(-1);
    lora_use_pool_for_blas();
    if (PyType_Ready(&PackedWeightType) < 0 ||
        PyModule_AddObjectRef(module, "PackedWeight", (PyObject *)&PackedWeightType) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_C", "lora's C kernels (see csrc/); use lora.functional.", 0,
    methods, slots, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&moduledef); }
