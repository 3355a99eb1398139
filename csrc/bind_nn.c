/* bind_nn.c: the bindings of the transformer layers other than Linear: exact GELU,
 * LayerNorm and multi-head attention, forward and backward (kernels: csrc/kernels/
 * elementwise.c and attention.c).
 *
 * Each reads: parse, validate (args.h), allocate outputs and scratch, run the kernel with the
 * GIL released (CALL_KERNEL), release everything at `done`. Only the attention arguments
 * that forward and backward share (attention_args) are checked here; the rest is args.h's.
 */
#include "py_common.h"

#include <math.h>

#include "args.h"
#include "bindings.h"
#include "kernels.h"

/* ------------------------------------------------------------------ GELU */

LORA_DOC(gelu_forward,
"gelu_forward(x)\n--\n\n"
"Exact GELU, ``x * Phi(x)`` with Phi the standard normal CDF, as\n"
"``torch.nn.GELU(approximate='none')``. float32 evaluates Phi to 1.2e-7 absolute with a\n"
"vectorised approximation; float64 uses erf.\n\n"
"Parameters\n----------\nx : ndarray, float32 or float64, any shape\n\n"
"Returns\n-------\ny : ndarray, the shape and dtype of x");

PyObject *py_gelu_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", NULL};
    PyObject *x_o;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:gelu_forward", kwlist, &x_o)) return NULL;
    Call c = CALL_INIT("gelu_forward", "x");
    PyArrayObject *x = NULL, *y = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &x, "x", x_o) || call_carrays(&c) ||
        call_new(&c, &y, PyArray_NDIM(x), PyArray_DIMS(x)))
        goto done;
    CALL_KERNEL(&c, gelu_forward, PyArray_DATA(y), PyArray_DATA(x), (size_t)PyArray_SIZE(x));
    result = Py_NewRef(y);
done:
    return call_end(&c, result);
}

LORA_DOC(gelu_backward,
"gelu_backward(dy, x)\n--\n\n"
"Backward of gelu_forward: ``dx = dy * (Phi(x) + x * phi(x))``.\n\n"
"Parameters\n----------\ndy : ndarray\nx : ndarray, the shape and dtype of dy\n\n"
"Returns\n-------\ndx : ndarray, the shape and dtype of x");

PyObject *py_gelu_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy", "x", NULL};
    PyObject *dy_o, *x_o;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:gelu_backward", kwlist, &dy_o, &x_o))
        return NULL;
    Call c = CALL_INIT("gelu_backward", "dy");
    PyArrayObject *dy = NULL, *x = NULL, *dx = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &x, "x", x_o) ||
        check_same_shape(&c, "x", x, dy, "dy.shape") || call_carrays(&c) ||
        call_new(&c, &dx, PyArray_NDIM(x), PyArray_DIMS(x)))
        goto done;
    CALL_KERNEL(&c, gelu_backward, PyArray_DATA(dx), PyArray_DATA(dy), PyArray_DATA(x),
                (size_t)PyArray_SIZE(x));
    result = Py_NewRef(dx);
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ LayerNorm */

LORA_DOC(layer_norm_forward,
"layer_norm_forward(x, weight, bias=None, *, eps=1e-5)\n--\n\n"
"LayerNorm over the last axis, as torch.nn.LayerNorm (biased variance, eps inside the root):\n"
"``y = (x - mean) / sqrt(var + eps) * weight + bias``.\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d)\nweight : ndarray, shape (d,)\nbias : ndarray, shape (d,), optional\n"
"eps : float >= 0\n\n"
"Returns\n-------\n"
"y : ndarray, shape (..., d)\nmean, rstd : ndarray, shape (...,)\n"
"    Row means and 1 / sqrt(var + eps), kept for layer_norm_backward.");

PyObject *py_layer_norm_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "weight", "bias", "eps", NULL};
    PyObject *x_o, *w_o, *b_o = Py_None, *eps_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$O:layer_norm_forward", kwlist, &x_o, &w_o,
                                     &b_o, &eps_o))
        return NULL;
    Call c = CALL_INIT("layer_norm_forward", "x");
    PyArrayObject *x = NULL, *w = NULL, *b = NULL, *y = NULL, *mean = NULL, *rstd = NULL;
    PyObject *result = NULL;
    double eps = 1e-5;
    if (arg_array(&c, &x, "x", x_o) || arg_array(&c, &w, "weight", w_o) ||
        arg_optional(&c, &b, "bias", b_o) || check_ndim(&c, "x", x, 1, 1))
        goto done;
    const int nd = PyArray_NDIM(x);
    npy_intp d = PyArray_DIM(x, nd - 1);
    if (check_blas_size(&c, "x", "the last dimension d", d, 1) ||
        check_shape(&c, "weight", w, 1, &d, "(d,)") ||
        (b && check_shape(&c, "bias", b, 1, &d, "(d,)")) ||
        arg_real(&c, "eps", eps_o, REAL_NONNEG, &eps) || call_carrays(&c) ||
        call_new(&c, &y, nd, PyArray_DIMS(x)) || call_new(&c, &mean, nd - 1, PyArray_DIMS(x)) ||
        call_new(&c, &rstd, nd - 1, PyArray_DIMS(x)))
        goto done;
    CALL_KERNEL(&c, layer_norm_forward, PyArray_DATA(y), PyArray_DATA(mean), PyArray_DATA(rstd),
                PyArray_DATA(x), PyArray_DATA(w), DATA_OR_NULL(b), eps, leading_rows(x), d);
    result = Py_BuildValue("(OOO)", y, mean, rstd);
done:
    return call_end(&c, result);
}

LORA_DOC(layer_norm_backward,
"layer_norm_backward(dy, x, mean, rstd, weight, *, need_dweight=True, need_dbias=True)\n--\n\n"
"Backward of layer_norm_forward.\n\n"
"Returns\n-------\n"
"dx : ndarray, shape (..., d)\n"
"dweight, dbias : ndarray, shape (d,), or None when not asked for");

PyObject *py_layer_norm_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy", "x", "mean", "rstd", "weight", "need_dweight", "need_dbias",
                             NULL};
    PyObject *dy_o, *x_o, *mean_o, *rstd_o, *w_o;
    int need_dw = 1, need_db = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|$pp:layer_norm_backward", kwlist, &dy_o,
                                     &x_o, &mean_o, &rstd_o, &w_o, &need_dw, &need_db))
        return NULL;
    Call c = CALL_INIT("layer_norm_backward", "dy");
    PyArrayObject *dy = NULL, *x = NULL, *mean = NULL, *rstd = NULL, *w = NULL;
    PyArrayObject *dx = NULL, *dw = NULL, *db = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &x, "x", x_o) ||
        arg_array(&c, &mean, "mean", mean_o) || arg_array(&c, &rstd, "rstd", rstd_o) ||
        arg_array(&c, &w, "weight", w_o) || check_ndim(&c, "x", x, 1, 1))
        goto done;
    const int nd = PyArray_NDIM(x);
    npy_intp d = PyArray_DIM(x, nd - 1);
    if (check_blas_size(&c, "x", "the last dimension d", d, 1) ||
        check_same_shape(&c, "dy", dy, x, "x.shape") ||
        check_shape(&c, "mean", mean, nd - 1, PyArray_DIMS(x), "x.shape[:-1]") ||
        check_shape(&c, "rstd", rstd, nd - 1, PyArray_DIMS(x), "x.shape[:-1]") ||
        check_shape(&c, "weight", w, 1, &d, "(d,)") || call_carrays(&c) ||
        call_new(&c, &dx, nd, PyArray_DIMS(x)) || (need_dw && call_zeros(&c, &dw, 1, &d)) ||
        (need_db && call_zeros(&c, &db, 1, &d)))
        goto done;
    CALL_KERNEL(&c, layer_norm_backward, PyArray_DATA(dx), DATA_OR_NULL(dw), DATA_OR_NULL(db),
                PyArray_DATA(dy), PyArray_DATA(x), PyArray_DATA(mean), PyArray_DATA(rstd),
                PyArray_DATA(w), leading_rows(x), d);
    result = Py_BuildValue("(OOO)", dx, OR_NONE(dw), OR_NONE(db));
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ attention */

static int attention_args(Call *c, PyArrayObject *q, PyArrayObject *k, PyArrayObject *v,
                          PyObject *heads_o, PyObject *mask_o, PyObject *scale_o,
                          PyObject *drop_o, PyObject *seed_o, LoraAttnDims *d,
                          PyArrayObject **mask, double *scale, double *p, uint64_t *seed) {
    const char *func = c->func;
    if (check_ndim(c, "q", q, 3, 0) || check_ndim(c, "k", k, 3, 0)) return -1;
    npy_intp batch = PyArray_DIM(q, 0), seq_q = PyArray_DIM(q, 1), hidden = PyArray_DIM(q, 2);
    npy_intp seq_k = PyArray_DIM(k, 1);
    npy_intp want_k[3] = {batch, seq_k, hidden};
    if (check_shape(c, "k", k, 3, want_k, "(batch, seq_k, hidden)") ||
        check_shape(c, "v", v, 3, want_k, "(batch, seq_k, hidden) = k.shape"))
        return -1;
    if (check_blas_size(c, "q", "hidden (q.shape[2])", hidden, 1) ||
        check_blas_size(c, "q", "seq_q (q.shape[1])", seq_q, 0) ||
        check_blas_size(c, "k", "seq_k (k.shape[1])", seq_k, 1))
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
        if (check_shape(c, "key_mask", (PyArrayObject *)mask_o, 2, want_m, "(batch, seq_k)"))
            return -1;
    }
    *scale = 1.0 / sqrt((double)d->head_dim);
    if (scale_o != Py_None && arg_real(c, "scale", scale_o, REAL_ANY, scale)) return -1;
    if (arg_dropout(c, drop_o, seed_o, p, seed)) return -1;
    *mask = NULL;
    if (mask_o == Py_None) return 0;
    *mask = (PyArrayObject *)PyArray_FromAny(mask_o, PyArray_DescrFromType(NPY_BOOL), 2, 2,
                                             NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST, NULL);
    return *mask ? call_hold(c, mask, 0) : -1;
}

LORA_DOC(attention_forward,
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

PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"q", "k", "v", "num_heads", "key_mask", "scale", "dropout", "seed",
                             NULL};
    PyObject *q_o, *k_o, *v_o, *heads_o, *mask_o = Py_None, *scale_o = NULL, *drop_o = NULL,
                                         *seed_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$OOOO:attention_forward", kwlist, &q_o,
                                     &k_o, &v_o, &heads_o, &mask_o, &scale_o, &drop_o, &seed_o))
        return NULL;
    Call c = CALL_INIT("attention_forward", "q");
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *mask = NULL, *ctx = NULL, *probs = NULL;
    PyObject *result = NULL;
    LoraAttnDims d;
    double scale, p;
    uint64_t seed;
    void *scratch;
    if (arg_array(&c, &q, "q", q_o) || arg_array(&c, &k, "k", k_o) ||
        arg_array(&c, &v, "v", v_o) ||
        attention_args(&c, q, k, v, heads_o, mask_o, scale_o, drop_o, seed_o, &d, &mask, &scale,
                       &p, &seed) ||
        call_carrays(&c))
        goto done;
    npy_intp pdims[4] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq_q,
                         (npy_intp)d.seq_k};
    const size_t parts = lora_attention_parts(&d), elem = PyArray_ITEMSIZE(q);
    if (call_new(&c, &ctx, 3, PyArray_DIMS(q)) || call_new(&c, &probs, 4, pdims) ||
        !(scratch = call_scratch_bytes(&c, lora_attention_scratch_bytes(&d, elem, parts))))
        goto done;
    CALL_KERNEL(&c, attention_forward, PyArray_DATA(ctx), PyArray_DATA(probs), scratch,
                PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), DATA_OR_NULL(mask), scale, p,
                seed, &d, parts);
    result = Py_BuildValue("(OO)", ctx, probs);
done:
    return call_end(&c, result);
}

LORA_DOC(attention_backward,
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

PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dctx", "q", "k", "v", "probs", "num_heads", "key_mask", "scale",
                             "dropout", "seed", NULL};
    PyObject *dctx_o, *q_o, *k_o, *v_o, *probs_o, *heads_o, *mask_o = Py_None, *scale_o = NULL,
                                                           *drop_o = NULL, *seed_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|$OOOO:attention_backward", kwlist,
                                     &dctx_o, &q_o, &k_o, &v_o, &probs_o, &heads_o, &mask_o,
                                     &scale_o, &drop_o, &seed_o))
        return NULL;
    Call c = CALL_INIT("attention_backward", "dctx");
    PyArrayObject *dctx = NULL, *q = NULL, *k = NULL, *v = NULL, *probs = NULL, *mask = NULL;
    PyArrayObject *dq = NULL, *dk = NULL, *dv = NULL;
    PyObject *result = NULL;
    LoraAttnDims d;
    double scale, p;
    uint64_t seed;
    void *scratch;
    if (arg_array(&c, &dctx, "dctx", dctx_o) || arg_array(&c, &q, "q", q_o) ||
        arg_array(&c, &k, "k", k_o) || arg_array(&c, &v, "v", v_o) ||
        arg_array(&c, &probs, "probs", probs_o) ||
        attention_args(&c, q, k, v, heads_o, mask_o, scale_o, drop_o, seed_o, &d, &mask, &scale,
                       &p, &seed))
        goto done;
    npy_intp pdims[4] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq_q,
                         (npy_intp)d.seq_k};
    const size_t parts = lora_attention_parts(&d), elem = PyArray_ITEMSIZE(q);
    if (check_same_shape(&c, "dctx", dctx, q, "q.shape") ||
        check_shape(&c, "probs", probs, 4, pdims, "(batch, num_heads, seq_q, seq_k)") ||
        call_carrays(&c) || call_new(&c, &dq, 3, PyArray_DIMS(q)) ||
        call_new(&c, &dk, 3, PyArray_DIMS(k)) || call_new(&c, &dv, 3, PyArray_DIMS(k)) ||
        !(scratch = call_scratch_bytes(&c, lora_attention_scratch_bytes(&d, elem, parts))))
        goto done;
    CALL_KERNEL(&c, attention_backward, PyArray_DATA(dq), PyArray_DATA(dk), PyArray_DATA(dv),
                scratch, PyArray_DATA(dctx), PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v),
                PyArray_DATA(probs), DATA_OR_NULL(mask), scale, p, seed, &d, parts);
    result = Py_BuildValue("(OOO)", dq, dk, dv);
done:
    return call_end(&c, result);
}
