/* args.c: argument checking for the bindings, and the bookkeeping of one call (see args.h).
 *
 * Holds one helper per kind of argument, the shape and aliasing checks, the copies of
 * read-only inputs, and the Call's outputs, scratch and release. It deliberately calls no
 * kernel and never releases the GIL.
 */
#include "py_common.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "args.h"
#include "scratch.h"

const char *type_name(int type) {
    return type == NPY_FLOAT32 ? "float32" : type == NPY_FLOAT64 ? "float64" : "?";
}

static void format_shape(char *buf, size_t size, int ndim, const npy_intp *dims) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %" NPY_INTP_FMT : "%" NPY_INTP_FMT,
                                 dims[i]);
    if (used < size) snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

int call_hold(Call *c, PyArrayObject **slot, int input) {
    if (c->n == CALL_MAX_ARRAYS) {
        Py_CLEAR(*slot);
        PyErr_Format(PyExc_SystemError, PREFIX "%s: more than %d arrays in one call", c->func,
                     CALL_MAX_ARRAYS);
        return -1;
    }
    c->held[c->n] = slot;
    c->input[c->n++] = (unsigned char)input;
    return 0;
}

/* The array behind obj with its dtype checked against the call's (the first array argument
 * sets it). When inplace, the array must also be writeable, aligned, native-order and
 * C-contiguous (ValueError otherwise): it is never copied. */
static int get_array(Call *c, PyArrayObject **slot, const char *name, PyObject *obj,
                     int inplace) {
    const char *func = c->func;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument '%s' must be a numpy.ndarray, got %s",
                     func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    int t = PyArray_TYPE(arr);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyObject *descr = PyObject_Str((PyObject *)PyArray_DESCR(arr));
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument '%s' must have dtype float32 or float64, got %S", func,
                     name, descr ? descr : Py_None);
        Py_XDECREF(descr);
        return -1;
    }
    if (c->type >= 0 && t != c->type) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument '%s' must have dtype %s (the dtype of '%s'), got %s",
                     func, name, type_name(c->type), c->type_ref, type_name(t));
        return -1;
    }
    c->type = t;
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
            return -1;
        }
    }
    Py_INCREF(arr);
    *slot = arr;
    return call_hold(c, slot, !inplace);
}

int arg_array(Call *c, PyArrayObject **slot, const char *name, PyObject *obj) {
    return get_array(c, slot, name, obj, 0);
}

int arg_optional(Call *c, PyArrayObject **slot, const char *name, PyObject *obj) {
    *slot = NULL;
    return obj == Py_None ? 0 : get_array(c, slot, name, obj, 0);
}

int arg_inplace(Call *c, PyArrayObject **slot, const char *name, PyObject *obj) {
    return get_array(c, slot, name, obj, 1);
}

int arg_array_list(Call *c, const char *name, PyObject *obj, int ndim, PyArrayObject ***items,
                   Py_ssize_t *len) {
    const int slot = c->list[0] ? 1 : 0;
    if (c->list[slot]) {
        PyErr_Format(PyExc_SystemError, PREFIX "%s: more than two list arguments", c->func);
        return -1;
    }
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument '%s' must be a list or tuple of numpy.ndarray, got %s",
                     c->func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyArrayObject **arr = PyMem_Calloc(n ? (size_t)n : 1, sizeof *arr);
    if (!arr) {
        PyErr_NoMemory();
        return -1;
    }
    c->list[slot] = arr, c->list_n[slot] = n;
    PyObject **seq = PySequence_Fast_ITEMS(obj);
    char item[96];
    for (Py_ssize_t k = 0; k < n; k++) {
        snprintf(item, sizeof item, "%s[%zd]", name, k);
        /* get_array holds its result in the Call; take it back into the list instead */
        const int held = c->n;
        PyArrayObject *a = NULL;
        if (get_array(c, &a, item, seq[k], 0)) return -1;
        c->n = held;
        arr[k] = a;
        if (check_ndim(c, item, a, ndim, 0)) return -1; /* made C-contiguous by call_carrays */
    }
    *items = arr, *len = n;
    return 0;
}

/* Replaces a read-only input by an aligned, native-order, C-contiguous copy when it is not
 * one already. */
static int as_carray(PyArrayObject **a) {
    if (!*a || (PyArray_ISCARRAY_RO(*a) && PyArray_ISNOTSWAPPED(*a))) return 0;
    PyArrayObject *c = (PyArrayObject *)PyArray_FromAny(
        (PyObject *)*a, PyArray_DescrFromType(PyArray_TYPE(*a)), 0, 0, NPY_ARRAY_CARRAY_RO, NULL);
    if (!c) return -1;
    Py_DECREF(*a);
    *a = c;
    return 0;
}

int call_carrays(Call *c) {
    for (int i = 0; i < c->n; i++)
        if (c->input[i] && as_carray(c->held[i])) return -1;
    for (int l = 0; l < 2; l++)
        for (Py_ssize_t k = 0; c->list[l] && k < c->list_n[l]; k++)
            if (as_carray(&c->list[l][k])) return -1;
    return 0;
}

int check_ndim(const Call *c, const char *name, PyArrayObject *a, int ndim, int at_least) {
    int nd = PyArray_NDIM(a);
    if (at_least ? nd >= ndim : nd == ndim) return 0;
    PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must be %s%d-D, got %d-D", c->func,
                 name, at_least ? "at least " : "", ndim, nd);
    return -1;
}

int check_shape(const Call *c, const char *name, PyArrayObject *a, int ndim,
                const npy_intp *want, const char *what) {
    if (PyArray_NDIM(a) == ndim &&
        (ndim == 0 || memcmp(PyArray_DIMS(a), want, ndim * sizeof(npy_intp)) == 0))
        return 0;
    char want_s[256], got_s[256];
    format_shape(want_s, sizeof want_s, ndim, want);
    format_shape(got_s, sizeof got_s, PyArray_NDIM(a), PyArray_DIMS(a));
    PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must have shape %s = %s, got %s",
                 c->func, name, what, want_s, got_s);
    return -1;
}

int check_same_shape(const Call *c, const char *name, PyArrayObject *a, PyArrayObject *like,
                     const char *what) {
    return check_shape(c, name, a, PyArray_NDIM(like), PyArray_DIMS(like), what);
}

int check_rows_like(const Call *c, const char *name, PyArrayObject *a, PyArrayObject *like,
                    npy_intp last, const char *what) {
    npy_intp want[NPY_MAXDIMS];
    int nd = PyArray_NDIM(like);
    memcpy(want, PyArray_DIMS(like), nd * sizeof(npy_intp));
    want[nd - 1] = last;
    return check_shape(c, name, a, nd, want, what);
}

int check_blas_size(const Call *c, const char *arg, const char *what, npy_intp size,
                    npy_intp lo) {
    if (size >= lo && size <= INT_MAX) return 0;
    if (size < lo)
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument '%s': %s must be at least %" NPY_INTP_FMT
                            ", got %" NPY_INTP_FMT,
                     c->func, arg, what, lo, size);
    else
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument '%s': %s is %" NPY_INTP_FMT
                            ", beyond what BLAS takes (at most %d)",
                     c->func, arg, what, size, INT_MAX);
    return -1;
}

npy_intp leading_rows(PyArrayObject *a) {
    npy_intp n = 1;
    for (int i = 0; i < PyArray_NDIM(a) - 1; i++) n *= PyArray_DIM(a, i);
    return n;
}

int check_x(const Call *c, PyArrayObject *x, npy_intp d_in) {
    return check_ndim(c, "x", x, 1, 1) || check_rows_like(c, "x", x, x, d_in, "(..., d_in)");
}

int count_rows(const Call *c, PyArrayObject *x, npy_intp *n) {
    *n = leading_rows(x);
    return check_blas_size(c, "x", "the number of rows of x", *n, 0);
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

int check_no_overlap(const Call *c, const char *out, PyArrayObject *a, const char *in,
                     PyArrayObject *b) {
    if (!overlap(a, b)) return 0;
    PyErr_Format(PyExc_ValueError,
                 PREFIX "%s: argument '%s' shares memory with argument '%s'; they must be "
                        "separate arrays",
                 c->func, out, in);
    return -1;
}

int arg_real(const Call *c, const char *name, PyObject *obj, int range, double *out) {
    if (!obj) return 0;
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument '%s' must be a real number, got %s",
                     c->func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *expected = NULL;
    if (!isfinite(v))
        expected = "a finite number";
    else if (c->type == NPY_FLOAT32 && fabs(v) > FLT_MAX) /* float32 kernels take it so */
        expected = "a number float32 holds (at most 3.4e38 in size) for float32 arrays";
    else if (range == REAL_NONNEG && v < 0)
        expected = "a number >= 0";
    else if (range == REAL_UNIT && !(v >= 0 && v < 1))
        expected = "a number in [0, 1)";
    if (expected) {
        PyErr_Format(PyExc_ValueError, PREFIX "%s: argument '%s' must be %s, got %R", c->func,
                     name, expected, obj);
        return -1;
    }
    *out = v;
    return 0;
}

int arg_int(const char *prefix, const char *func, const char *name, PyObject *obj,
            long long lo, long long hi, long long *out) {
    PyObject *as_int = PyLong_Check(obj) ? Py_NewRef(obj)
                       : PyIndex_Check(obj) && !PyFloat_Check(obj) ? PyNumber_Index(obj) : NULL;
    if (!as_int) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s%s: argument '%s' must be an int, got %R", prefix, func,
                     name, obj);
        return -1;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(as_int, &overflow);
    Py_DECREF(as_int);
    if (v == -1 && !overflow && PyErr_Occurred()) return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s%s: argument '%s' must be an int in [%lld, %lld], got %R",
                     prefix, func, name, lo, hi, obj);
        return -1;
    }
    *out = v;
    return 0;
}

/* The dropout seed: required (an int in [0, 2**64)) when dropout > 0, ignored otherwise. */
static int get_seed(const Call *c, PyObject *obj, double p, uint64_t *out) {
    const char *func = c->func;
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
    if (!as_int) { /* e.g. a float array, whose __index__ refuses */
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument 'seed' must be an int, got %R", func,
                     obj);
        return -1;
    }
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

int arg_dropout(const Call *c, PyObject *drop_o, PyObject *seed_o, double *p, uint64_t *seed) {
    *p = 0.0;
    return arg_real(c, "dropout", drop_o, REAL_UNIT, p) || get_seed(c, seed_o, *p, seed);
}

int call_new(Call *c, PyArrayObject **slot, int nd, const npy_intp *dims) {
    *slot = (PyArrayObject *)PyArray_SimpleNew(nd, (npy_intp *)dims, c->type);
    return *slot ? call_hold(c, slot, 0) : -1;
}

int call_zeros(Call *c, PyArrayObject **slot, int nd, npy_intp *dims) {
    *slot = (PyArrayObject *)PyArray_ZEROS(nd, dims, c->type, 0);
    return *slot ? call_hold(c, slot, 0) : -1;
}

int call_new_rows(Call *c, PyArrayObject **slot, PyArrayObject *like, npy_intp last) {
    npy_intp dims[NPY_MAXDIMS];
    int nd = PyArray_NDIM(like);
    memcpy(dims, PyArray_DIMS(like), nd * sizeof(npy_intp));
    dims[nd - 1] = last;
    return call_new(c, slot, nd, dims);
}

/* A call takes at most two buffers (its own and the packed GEMM's). */
static void *keep_scratch(Call *c, void *p) {
    c->scratch[c->scratch[0] ? 1 : 0] = p;
    return p;
}

void *call_scratch_bytes(Call *c, size_t bytes) { return keep_scratch(c, take_bytes(bytes)); }

void *call_scratch(Call *c, size_t elems) { return keep_scratch(c, take_scratch(elems, c->type)); }

PyObject *call_end(Call *c, PyObject *result) {
    give_scratch(c->scratch[0]);
    give_scratch(c->scratch[1]);
    for (int i = 0; i < c->n; i++) Py_CLEAR(*c->held[i]);
    Py_XDECREF(c->obj);
    for (int l = 0; l < 2; l++) {
        for (Py_ssize_t k = 0; c->list[l] && k < c->list_n[l]; k++) Py_XDECREF(c->list[l][k]);
        PyMem_Free(c->list[l]);
    }
    return result;
}

int check_lora_pair(const Call *c, PyArrayObject *A, PyArrayObject *B, npy_intp d_out,
                    npy_intp d_in, npy_intp *r) {
    if (check_ndim(c, "A", A, 2, 0) || check_ndim(c, "B", B, 2, 0)) return -1;
    *r = PyArray_DIM(A, 0);
    if (check_blas_size(c, "A", "the rank r (A.shape[0])", *r, 1)) return -1;
    npy_intp want_a[2] = {*r, d_in}, want_b[2] = {d_out, *r};
    if (check_shape(c, "A", A, 2, want_a, "(r, d_in)") ||
        check_shape(c, "B", B, 2, want_b, "(d_out, r)"))
        return -1;
    return 0;
}
