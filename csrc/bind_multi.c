/* bind_multi.c: the binding of batches that mix adapters, mixed_forward: one frozen weight
 * (an array, a PackedWeight or a QuantWeight), many LoRA pairs, an adapter per row. The
 * kernel is lora_mixed_forward (csrc/kernels/multi_impl.h).
 */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "kernels.h"
#include "packed.h"

LORA_DOC(mixed_forward,
"mixed_forward(x, weight, A, B, scales, adapter_ids, bias=None, *, fan_in_fan_out=False,\n"
"              residual=None, b_transposed=False)\n--\n\n"
"Forward of a LoRA linear layer whose rows use different adapters (S-LoRA's and\n"
"Punica's segmented LoRA): row i of x gets adapter ``a = adapter_ids[i]``,\n"
"``y_i = x_i @ weight.T + bias + scales[a] * (x_i @ A[a].T) @ B[a].T (+ residual_i)``,\n"
"or the base layer alone where ``adapter_ids[i] == -1``. No dropout (inference).\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d_in)\n"
"weight : ndarray, shape (d_out, d_in), a PackedWeight or a QuantWeight\n"
"A : list or tuple of ndarray, shapes (r_a, d_in)\n"
"B : list or tuple of ndarray, shapes (d_out, r_a)\n"
"    One pair per adapter; ranks may differ between adapters.\n"
"scales : sequence of float, one per adapter\n"
"adapter_ids : integer ndarray, shape x.shape[:-1]\n"
"    Each row's adapter, an index into A and B, or -1 for none.\n"
"bias, fan_in_fan_out, residual : as for linear_forward\n"
"b_transposed : bool\n"
"    B holds each adapter's B transposed, shapes (r_a, d_out): the layout the kernel\n"
"    reads, kept by a caller that calls many times (a decode loop) so that no call\n"
"    transposes it again.\n\n"
"Returns\n-------\n"
"y : ndarray, shape (..., d_out)\n\n"
"The rows are grouped by adapter (one copy of x's rows, none for runs of consecutive\n"
"rows); each adapter present costs one pass over its A and B. All arrays share one\n"
"dtype, float32 or float64.");

/* scales: a sequence of n finite reals into out[0..n). */
static int arg_scales(const Call *c, PyObject *obj, Py_ssize_t n, double *out) {
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'scales' must be a sequence of numbers, got %s",
                     c->func, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int rc = 0;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'scales' must have one value per adapter (%zd), got %zd",
                     c->func, n, PySequence_Fast_GET_SIZE(seq));
        rc = -1;
    }
    char name[64];
    for (Py_ssize_t k = 0; !rc && k < n; k++) {
        snprintf(name, sizeof name, "scales[%zd]", k);
        rc = arg_real(c, name, PySequence_Fast_GET_ITEM(seq, k), REAL_ANY, &out[k]);
    }
    Py_DECREF(seq);
    return rc;
}

/* adapter_ids: integers of shape x.shape[:-1], each in [-1, n_adapters), as an int64 array
 * (a new reference in *ids). */
static int arg_ids(const Call *c, PyObject *obj, PyArrayObject *x, Py_ssize_t n_adapters,
                   PyArrayObject **ids) {
    *ids = NULL;
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(obj, NPY_NOTYPE, 0, 0, 0);
    if (!in) return -1;
    if (!PyArray_ISINTEGER(in)) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'adapter_ids' must hold integers, got dtype %S",
                     c->func, (PyObject *)PyArray_DESCR(in));
        Py_DECREF(in);
        return -1;
    }
    const int nd = PyArray_NDIM(x) - 1;
    if (PyArray_NDIM(in) != nd ||
        memcmp(PyArray_DIMS(in), PyArray_DIMS(x), (size_t)nd * sizeof(npy_intp)) != 0) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'adapter_ids' must have shape x.shape[:-1], one "
                            "adapter per row of x",
                     c->func);
        Py_DECREF(in);
        return -1;
    }
    *ids = (PyArrayObject *)PyArray_FROMANY((PyObject *)in, NPY_INT64, 0, 0,
                                            NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    Py_DECREF(in);
    if (!*ids) return -1;
    const int64_t *v = PyArray_DATA(*ids);
    for (npy_intp i = 0, n = PyArray_SIZE(*ids); i < n; i++)
        if (v[i] < -1 || v[i] >= n_adapters) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: argument 'adapter_ids' holds %lld at flat index %zd; ids "
                                "must be in [-1, %zd) (-1: the base layer alone)",
                         c->func, (long long)v[i], (Py_ssize_t)i, n_adapters);
            Py_CLEAR(*ids);
            return -1;
        }
    return 0;
}

PyObject *py_mixed_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x",    "weight",         "A",        "B",            "scales",
                             "adapter_ids", "bias", "fan_in_fan_out", "residual",
                             "b_transposed", NULL};
    PyObject *x_o, *w_o, *a_o, *b_o, *scales_o, *ids_o, *bias_o = Py_None, *res_o = Py_None;
    int wt = 0, bt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|O$pOp:mixed_forward", kwlist, &x_o,
                                     &w_o, &a_o, &b_o, &scales_o, &ids_o, &bias_o, &wt, &res_o,
                                     &bt))
        return NULL;
    Call c = CALL_INIT("mixed_forward", "x");
    PyArrayObject *x = NULL, *bias = NULL, *res = NULL, *y = NULL, *ids = NULL;
    PyArrayObject **As, **Bs;
    Py_ssize_t na, nb;
    PyObject *result = NULL;
    double *scale = NULL;
    size_t *rank = NULL;
    const void **a_data = NULL, **b_data = NULL;
    WeightArg w;
    npy_intp n;
    if (arg_array(&c, &x, "x", x_o) || arg_weight(&c, w_o, wt, 0, &w) ||
        arg_array_list(&c, "A", a_o, 2, &As, &na) || arg_array_list(&c, "B", b_o, 2, &Bs, &nb) ||
        arg_optional(&c, &bias, "bias", bias_o) || check_x(&c, x, w.d_in) ||
        count_rows(&c, x, &n) ||
        (bias && check_shape(&c, "bias", bias, 1, &w.d_out, "(d_out,)")))
        goto done;
    if (res_o != Py_None &&
        (arg_array(&c, &res, "residual", res_o) ||
         check_rows_like(&c, "residual", res, x, w.d_out, "(..., d_out), the shape of y")))
        goto done;
    if (na != nb) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "mixed_forward: arguments 'A' and 'B' must hold one array per "
                            "adapter each, got %zd and %zd",
                     na, nb);
        goto done;
    }
    const size_t k_n = (size_t)na;
    scale = PyMem_Calloc(k_n + 1, sizeof *scale);
    rank = PyMem_Calloc(k_n + 1, sizeof *rank);
    a_data = PyMem_Calloc(k_n + 1, sizeof *a_data);
    b_data = PyMem_Calloc(k_n + 1, sizeof *b_data);
    if (!scale || !rank || !a_data || !b_data) {
        PyErr_NoMemory();
        goto done;
    }
    char an[48], bn[48];
    for (Py_ssize_t k = 0; k < na; k++) {
        snprintf(an, sizeof an, "A[%zd]", k);
        snprintf(bn, sizeof bn, "B[%zd]", k);
        const npy_intp r = PyArray_DIM(As[k], 0);
        const npy_intp want_a[2] = {r, w.d_in}, want_b[2] = {bt ? r : w.d_out, bt ? w.d_out : r};
        if (check_blas_size(&c, an, "the rank r (A[k].shape[0])", r, 1) ||
            check_shape(&c, an, As[k], 2, want_a, "(r, d_in)") ||
            check_shape(&c, bn, Bs[k], 2, want_b,
                        bt ? "(r, d_out), r = A[k].shape[0]" : "(d_out, r), r = A[k].shape[0]"))
            goto done;
        rank[k] = (size_t)r;
    }
    if (arg_scales(&c, scales_o, na, scale) || arg_ids(&c, ids_o, x, na, &ids) ||
        call_carrays(&c))
        goto done;
    for (Py_ssize_t k = 0; k < na; k++) /* the items as call_carrays left them */
        a_data[k] = PyArray_DATA(As[k]), b_data[k] = PyArray_DATA(Bs[k]);

    /* the rows with an adapter and the largest rank among them size the scratch */
    const int64_t *id = PyArray_DATA(ids);
    size_t m = 0, r_max = 0;
    for (npy_intp i = 0; i < n; i++)
        if (id[i] >= 0) {
            m++;
            if (rank[id[i]] > r_max) r_max = rank[id[i]];
        }
    const size_t parts = lora_mixed_parts(m, (size_t)w.d_in, (size_t)w.d_out, r_max);
    const size_t index_bytes =
        (lora_mixed_index_elems((size_t)n, k_n) * sizeof(size_t) + 63) / 64 * 64;
    const size_t elem = (size_t)PyArray_ITEMSIZE(x);
    char *scratch;
    if (call_new_rows(&c, &y, x, w.d_out) ||
        !(scratch = call_scratch_bytes(
              &c, index_bytes +
                      parts * lora_mixed_part_elems((size_t)w.d_in, (size_t)w.d_out, r_max) *
                          elem)) ||
        weight_panels(&c, &w, n))
        goto done;

    CALL_KERNEL(&c, lora_mixed_forward, PyArray_DATA(y), (void *)(scratch + index_bytes),
                (size_t *)scratch, PyArray_DATA(x), weight_data(&w), DATA_OR_NULL(bias),
                DATA_OR_NULL(res), a_data, b_data, scale, rank, id, (size_t)n,
                (size_t)w.d_in, (size_t)w.d_out, k_n, r_max, parts, wt, bt, w.kernel);
    result = Py_NewRef(y);
done:
    Py_XDECREF(ids);
    PyMem_Free(scale);
    PyMem_Free(rank);
    PyMem_Free(a_data);
    PyMem_Free(b_data);
    return call_end(&c, result);
}
