/* bind_loss.c: the binding of the fused lm_head + cross-entropy (kernels/lm_loss.c).
 *
 * Reads as the others: parse, validate (args.h; the labels here: any integer dtype, each a
 * class index or ignore_index), allocate outputs and scratch, run the kernel with the GIL
 * released, release everything at `done`. The mean's divisor (the counted rows) is found
 * while the labels are checked, so the kernel writes the gradient of the mean directly.
 */
#include "py_common.h"

#include <math.h>

#include "args.h"
#include "bindings.h"
#include "kernels.h"

LORA_DOC(linear_cross_entropy,
"linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, chunk=None,\n"
"                     need_dhidden=True, need_dweight=False)\n--\n\n"
"The output layer and its cross-entropy in one pass, ``chunk`` rows at a time: logits =\n"
"hidden @ weight.T, loss = mean over rows whose label is not ignore_index of\n"
"logsumexp(logits) - logits[label] (nan when no row counts, as torch's mean). The scores of\n"
"a chunk become their gradient in place, so no (n, V) array is ever allocated.\n\n"
"Parameters\n----------\n"
"hidden : ndarray, shape (n, d)\nweight : ndarray, shape (V, d)\n"
"labels : integer ndarray, shape (n,); each in [0, V) or ignore_index\n"
"ignore_index : int\nchunk : int >= 1 or None (rows per chunk; None: about 8 MB of scores)\n\n"
"Returns\n-------\n"
"loss : float\n"
"dhidden : ndarray, shape (n, d), or None; the gradient of the mean loss\n"
"dweight : ndarray, shape (V, d), or None (need_dweight)");

PyObject *py_linear_cross_entropy(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"hidden", "weight", "labels", "ignore_index", "chunk",
                             "need_dhidden", "need_dweight", NULL};
    PyObject *h_o, *w_o, *lab_o, *ignore_o = NULL, *chunk_o = Py_None;
    int need_dh = 1, need_dw = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$OOpp:linear_cross_entropy", kwlist, &h_o,
                                     &w_o, &lab_o, &ignore_o, &chunk_o, &need_dh, &need_dw))
        return NULL;
    const char *func = "linear_cross_entropy";
    Call c = CALL_INIT(func, "hidden");
    PyArrayObject *h = NULL, *w = NULL, *lab = NULL, *dh = NULL, *dw = NULL;
    PyObject *result = NULL;
    long long ignore = -100, chunk = 0;
    if (arg_array(&c, &h, "hidden", h_o) || arg_array(&c, &w, "weight", w_o) ||
        check_ndim(&c, "hidden", h, 2, 0) || check_ndim(&c, "weight", w, 2, 0))
        goto done;
    const npy_intp n = PyArray_DIM(h, 0), d = PyArray_DIM(h, 1), V = PyArray_DIM(w, 0);
    npy_intp want_w[2] = {V, d};
    if (check_blas_size(&c, "hidden", "d (shape[1])", d, 1) ||
        check_blas_size(&c, "hidden", "n (shape[0])", n, 0) ||
        check_blas_size(&c, "weight", "V (shape[0])", V, 1) ||
        check_shape(&c, "weight", w, 2, want_w, "(V, d) with d = hidden.shape[1]"))
        goto done;
    if (ignore_o && arg_int(PREFIX, func, "ignore_index", ignore_o, LLONG_MIN, LLONG_MAX, &ignore))
        goto done;
    if (chunk_o != Py_None && arg_int(PREFIX, func, "chunk", chunk_o, 1, INT_MAX, &chunk))
        goto done;
    if (!PyArray_Check(lab_o) || !PyArray_ISINTEGER((PyArrayObject *)lab_o)) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'labels' must be a numpy.ndarray of integer dtype, "
                            "got %s",
                     func, PyArray_Check(lab_o) ? "an array of another dtype"
                                                : Py_TYPE(lab_o)->tp_name);
        goto done;
    }
    if (check_shape(&c, "labels", (PyArrayObject *)lab_o, 1, &n, "(n,) with n = hidden.shape[0]"))
        goto done;
    lab = (PyArrayObject *)PyArray_FromAny(lab_o, PyArray_DescrFromType(NPY_INT64), 1, 1,
                                           NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST, NULL);
    if (!lab || call_hold(&c, &lab, 0)) goto done;
    const int64_t *labels = PyArray_DATA(lab);
    npy_intp counted = 0;
    for (npy_intp i = 0; i < n; i++) {
        if (labels[i] == ignore) continue;
        if (labels[i] < 0 || labels[i] >= V) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: argument 'labels' must hold class indices in [0, V = "
                                "%" NPY_INTP_FMT ") or ignore_index (%lld); labels[%" NPY_INTP_FMT
                                "] = %lld",
                         func, V, ignore, i, (long long)labels[i]);
            goto done;
        }
        counted++;
    }
    const size_t elem = c.type == NPY_FLOAT32 ? sizeof(float) : sizeof(double);
    if (!chunk) { /* about 8 MB of scores, at least 16 rows for the GEMMs */
        chunk = (long long)((8u << 20) / ((size_t)V * elem));
        if (chunk < 16) chunk = 16;
    }
    if (n && chunk > n) chunk = n;
    if (call_carrays(&c) || (need_dh && call_new(&c, &dh, 2, PyArray_DIMS(h))) ||
        (need_dw && call_zeros(&c, &dw, 2, want_w)))
        goto done;
    double loss = NAN;
    if (n) {
        void *scratch = call_scratch_bytes(&c, lora_lm_loss_scratch_bytes((size_t)chunk, V, elem));
        if (!scratch) goto done;
        const double g = counted ? 1.0 / (double)counted : 0.0;
        double total;
        const int f32 = c.type == NPY_FLOAT32;
        Py_BEGIN_ALLOW_THREADS;
        if (f32)
            total = linear_cross_entropy_f32(DATA_OR_NULL(dh), DATA_OR_NULL(dw), scratch,
                                             PyArray_DATA(h), PyArray_DATA(w), labels, ignore,
                                             (float)g, n, d, V, (size_t)chunk);
        else
            total = linear_cross_entropy_f64(DATA_OR_NULL(dh), DATA_OR_NULL(dw), scratch,
                                             PyArray_DATA(h), PyArray_DATA(w), labels, ignore, g,
                                             n, d, V, (size_t)chunk);
        Py_END_ALLOW_THREADS;
        if (counted) loss = total / (double)counted;
    } else if (dh == NULL && need_dh) {
        goto done;
    }
    result = Py_BuildValue("(dOO)", loss, OR_NONE(dh), OR_NONE(dw));
done:
    return call_end(&c, result);
}
