/* bind_llama.c: the bindings of the Llama-family operations: RMSNorm, rotary position
 * embedding (in place), SwiGLU and causal grouped-query attention, forward and backward
 * (kernels: csrc/kernels/llama.c).
 *
 * Each reads: parse, validate (args.h), allocate outputs and scratch, run the kernel with the
 * GIL released (CALL_KERNEL), release everything at `done`. Only what these functions share
 * (a head count, the attention sizes and key mask) is checked here; the rest is args.h's.
 */
#include "py_common.h"

#include <math.h>

#include "args.h"
#include "bindings.h"
#include "kernels.h"

/* An int argument in [1, limit] dividing `divides`, into *out. */
static int arg_heads(const Call *c, const char *name, PyObject *obj, npy_intp divides,
                     const char *what, npy_intp *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument '%s' must be an int, got %s",
                     c->func, name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) PyErr_Clear();
    if (v < 1 || v > divides || divides % v) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument '%s' must be a positive divisor of %s = %" NPY_INTP_FMT
                            ", got %R",
                     c->func, name, what, divides, obj);
        return -1;
    }
    *out = (npy_intp)v;
    return 0;
}

/* ------------------------------------------------------------------ RMSNorm */

LORA_DOC(rms_norm_forward,
"rms_norm_forward(x, weight, *, eps=1e-6)\n--\n\n"
"RMSNorm over the last axis, as transformers' LlamaRMSNorm (eps inside the root, computed in\n"
"the input dtype): ``y = x / sqrt(mean(x**2) + eps) * weight``.\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d)\nweight : ndarray, shape (d,)\neps : float >= 0\n\n"
"Returns\n-------\n"
"y : ndarray, shape (..., d)\nrstd : ndarray, shape (...,)\n"
"    1 / sqrt(mean(x**2) + eps) per row, kept for rms_norm_backward.");

PyObject *py_rms_norm_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "weight", "eps", NULL};
    PyObject *x_o, *w_o, *eps_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$O:rms_norm_forward", kwlist, &x_o, &w_o,
                                     &eps_o))
        return NULL;
    Call c = CALL_INIT("rms_norm_forward", "x");
    PyArrayObject *x = NULL, *w = NULL, *y = NULL, *rstd = NULL;
    PyObject *result = NULL;
    double eps = 1e-6;
    if (arg_array(&c, &x, "x", x_o) || arg_array(&c, &w, "weight", w_o) ||
        check_ndim(&c, "x", x, 1, 1))
        goto done;
    const int nd = PyArray_NDIM(x);
    npy_intp d = PyArray_DIM(x, nd - 1);
    if (check_blas_size(&c, "x", "the last dimension d", d, 1) ||
        check_shape(&c, "weight", w, 1, &d, "(d,)") ||
        arg_real(&c, "eps", eps_o, REAL_NONNEG, &eps) || call_carrays(&c) ||
        call_new(&c, &y, nd, PyArray_DIMS(x)) || call_new(&c, &rstd, nd - 1, PyArray_DIMS(x)))
        goto done;
    CALL_KERNEL(&c, rms_norm_forward, PyArray_DATA(y), PyArray_DATA(rstd), PyArray_DATA(x),
                PyArray_DATA(w), eps, leading_rows(x), d);
    result = Py_BuildValue("(OO)", y, rstd);
done:
    return call_end(&c, result);
}

LORA_DOC(rms_norm_backward,
"rms_norm_backward(dy, x, rstd, weight, *, need_dweight=True)\n--\n\n"
"Backward of rms_norm_forward: with ``xhat = x * rstd`` and ``g = dy * weight``,\n"
"``dx = rstd * (g - xhat * mean(g * xhat))``, ``dweight = sum(dy * xhat)`` over the rows.\n\n"
"Returns\n-------\n"
"dx : ndarray, shape (..., d)\n"
"dweight : ndarray, shape (d,), or None when not asked for");

PyObject *py_rms_norm_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy", "x", "rstd", "weight", "need_dweight", NULL};
    PyObject *dy_o, *x_o, *rstd_o, *w_o;
    int need_dw = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$p:rms_norm_backward", kwlist, &dy_o,
                                     &x_o, &rstd_o, &w_o, &need_dw))
        return NULL;
    Call c = CALL_INIT("rms_norm_backward", "dy");
    PyArrayObject *dy = NULL, *x = NULL, *rstd = NULL, *w = NULL, *dx = NULL, *dw = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &x, "x", x_o) ||
        arg_array(&c, &rstd, "rstd", rstd_o) || arg_array(&c, &w, "weight", w_o) ||
        check_ndim(&c, "x", x, 1, 1))
        goto done;
    const int nd = PyArray_NDIM(x);
    npy_intp d = PyArray_DIM(x, nd - 1);
    if (check_blas_size(&c, "x", "the last dimension d", d, 1) ||
        check_same_shape(&c, "dy", dy, x, "x.shape") ||
        check_shape(&c, "rstd", rstd, nd - 1, PyArray_DIMS(x), "x.shape[:-1]") ||
        check_shape(&c, "weight", w, 1, &d, "(d,)") || call_carrays(&c) ||
        call_new(&c, &dx, nd, PyArray_DIMS(x)) || (need_dw && call_zeros(&c, &dw, 1, &d)))
        goto done;
    CALL_KERNEL(&c, rms_norm_backward, PyArray_DATA(dx), DATA_OR_NULL(dw), PyArray_DATA(dy),
                PyArray_DATA(x), PyArray_DATA(rstd), PyArray_DATA(w), leading_rows(x), d);
    result = Py_BuildValue("(OO)", dx, OR_NONE(dw));
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ RoPE */

/* x (batch, seq, hidden) in place, cos and sin (seq, head_dim) or (batch, seq, head_dim). */
static PyObject *rope_call(const char *func, const char *xname, PyObject *args, PyObject *kwds,
                           int backward) {
    static char *kwlist_f[] = {"x", "cos", "sin", "num_heads", NULL};
    static char *kwlist_b[] = {"dx", "cos", "sin", "num_heads", NULL};
    PyObject *x_o, *cos_o, *sin_o, *heads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, backward ? "OOOO:rope_backward"
                                                          : "OOOO:rope_forward",
                                     backward ? kwlist_b : kwlist_f, &x_o, &cos_o, &sin_o,
                                     &heads_o))
        return NULL;
    Call c = CALL_INIT(func, xname);
    PyArrayObject *x = NULL, *cs = NULL, *sn = NULL;
    PyObject *result = NULL;
    npy_intp heads;
    if (arg_inplace(&c, &x, xname, x_o) || arg_array(&c, &cs, "cos", cos_o) ||
        arg_array(&c, &sn, "sin", sin_o) || check_ndim(&c, xname, x, 3, 0))
        goto done;
    const npy_intp batch = PyArray_DIM(x, 0), seq = PyArray_DIM(x, 1), hidden = PyArray_DIM(x, 2);
    if (check_blas_size(&c, xname, "hidden (shape[2])", hidden, 1) ||
        arg_heads(&c, "num_heads", heads_o, hidden, "hidden (shape[2])", &heads))
        goto done;
    const npy_intp head_dim = hidden / heads;
    if (head_dim % 2) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: head_dim = hidden / num_heads must be even, got %" NPY_INTP_FMT,
                     func, head_dim);
        goto done;
    }
    const int per_item = PyArray_NDIM(cs) == 3;
    npy_intp want2[2] = {seq, head_dim}, want3[3] = {batch, seq, head_dim};
    if (per_item ? check_shape(&c, "cos", cs, 3, want3, "(batch, seq, head_dim)")
                 : check_shape(&c, "cos", cs, 2, want2, "(seq, head_dim)"))
        goto done;
    if (check_same_shape(&c, "sin", sn, cs, "cos.shape") ||
        check_no_overlap(&c, xname, x, "cos", cs) || check_no_overlap(&c, xname, x, "sin", sn) ||
        call_carrays(&c))
        goto done;
    if (backward)
        CALL_KERNEL(&c, rope_backward, PyArray_DATA(x), PyArray_DATA(cs), PyArray_DATA(sn),
                    (size_t)batch, (size_t)seq, (size_t)heads, (size_t)head_dim, per_item);
    else
        CALL_KERNEL(&c, rope_forward, PyArray_DATA(x), PyArray_DATA(cs), PyArray_DATA(sn),
                    (size_t)batch, (size_t)seq, (size_t)heads, (size_t)head_dim, per_item);
    result = Py_NewRef(x);
done:
    return call_end(&c, result);
}

LORA_DOC(rope_forward,
"rope_forward(x, cos, sin, num_heads)\n--\n\n"
"Rotary position embedding applied IN PLACE to q or k, as transformers'\n"
"apply_rotary_pos_emb: ``x = x * cos + rotate_half(x) * sin`` per head, where rotate_half\n"
"pairs element i with i + head_dim/2.\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (batch, seq, num_heads*head_dim), writeable and C-contiguous\n"
"cos, sin : ndarray, shape (seq, head_dim) or (batch, seq, head_dim)\n"
"    The tables of each position (per item for left-padded batches).\n"
"num_heads : int, divides x.shape[2]; head_dim must be even\n\n"
"Returns\n-------\nx : the same array, rotated");

PyObject *py_rope_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return rope_call("rope_forward", "x", args, kwds, 0);
}

LORA_DOC(rope_backward,
"rope_backward(dx, cos, sin, num_heads)\n--\n\n"
"Backward of rope_forward, IN PLACE on the gradient: the transpose of the rotation (the\n"
"inverse rotation) with the same cos and sin.\n\n"
"Returns\n-------\ndx : the same array, rotated back");

PyObject *py_rope_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return rope_call("rope_backward", "dx", args, kwds, 1);
}

/* ------------------------------------------------------------------ SwiGLU */

LORA_DOC(swiglu_forward,
"swiglu_forward(gate, up)\n--\n\n"
"``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``: the Llama MLP's\n"
"``act_fn(gate_proj(x)) * up_proj(x)``.\n\n"
"Parameters\n----------\ngate : ndarray, any shape\nup : ndarray, the shape of gate\n\n"
"Returns\n-------\ny : ndarray, the shape of gate");

PyObject *py_swiglu_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"gate", "up", NULL};
    PyObject *g_o, *u_o;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:swiglu_forward", kwlist, &g_o, &u_o))
        return NULL;
    Call c = CALL_INIT("swiglu_forward", "gate");
    PyArrayObject *g = NULL, *u = NULL, *y = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &g, "gate", g_o) || arg_array(&c, &u, "up", u_o) ||
        check_same_shape(&c, "up", u, g, "gate.shape") || call_carrays(&c) ||
        call_new(&c, &y, PyArray_NDIM(g), PyArray_DIMS(g)))
        goto done;
    CALL_KERNEL(&c, swiglu_forward, PyArray_DATA(y), PyArray_DATA(g), PyArray_DATA(u),
                (size_t)PyArray_SIZE(g));
    result = Py_NewRef(y);
done:
    return call_end(&c, result);
}

LORA_DOC(swiglu_backward,
"swiglu_backward(dy, gate, up)\n--\n\n"
"Backward of swiglu_forward: with ``s = sigmoid(gate)``,\n"
"``dgate = dy * up * s * (1 + gate * (1 - s))`` and ``dup = dy * gate * s``.\n\n"
"Returns\n-------\ndgate, dup : ndarray, the shape of gate");

PyObject *py_swiglu_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy", "gate", "up", NULL};
    PyObject *dy_o, *g_o, *u_o;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:swiglu_backward", kwlist, &dy_o, &g_o,
                                     &u_o))
        return NULL;
    Call c = CALL_INIT("swiglu_backward", "dy");
    PyArrayObject *dy = NULL, *g = NULL, *u = NULL, *dg = NULL, *du = NULL;
    PyObject *result = NULL;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &g, "gate", g_o) ||
        arg_array(&c, &u, "up", u_o) || check_same_shape(&c, "gate", g, dy, "dy.shape") ||
        check_same_shape(&c, "up", u, dy, "dy.shape") || call_carrays(&c) ||
        call_new(&c, &dg, PyArray_NDIM(g), PyArray_DIMS(g)) ||
        call_new(&c, &du, PyArray_NDIM(g), PyArray_DIMS(g)))
        goto done;
    CALL_KERNEL(&c, swiglu_backward, PyArray_DATA(dg), PyArray_DATA(du), PyArray_DATA(dy),
                PyArray_DATA(g), PyArray_DATA(u), (size_t)PyArray_SIZE(g));
    result = Py_BuildValue("(OO)", dg, du);
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ causal GQA attention */

/* q (batch, seq, hidden), k and v (batch, kv_seq, kv_hidden): kv_seq = seq, or for the
 * forward (kv_len_o not NULL) a KV cache with kv_len (default kv_seq) in [seq, kv_seq] keys
 * read; key_mask (batch, kv_len) or (batch, kv_seq). */
static int causal_args(Call *c, PyArrayObject *q, PyArrayObject *k, PyArrayObject *v,
                       PyObject *heads_o, PyObject *kv_o, PyObject *mask_o, PyObject *scale_o,
                       PyObject *kv_len_o, LoraGqaDims *d, PyArrayObject **mask,
                       double *scale) {
    const char *func = c->func;
    npy_intp heads, kv_heads;
    if (check_ndim(c, "q", q, 3, 0) || check_ndim(c, "k", k, 3, 0)) return -1;
    const npy_intp batch = PyArray_DIM(q, 0), seq = PyArray_DIM(q, 1), hq = PyArray_DIM(q, 2);
    const npy_intp kv_seq = PyArray_DIM(k, 1);
    if (check_blas_size(c, "q", "hidden (q.shape[2])", hq, 1) ||
        check_blas_size(c, "q", "seq (q.shape[1])", seq, 0) ||
        check_blas_size(c, "k", "kv_seq (k.shape[1])", kv_seq, 0) ||
        arg_heads(c, "num_heads", heads_o, hq, "q.shape[2]", &heads) ||
        arg_heads(c, "num_kv_heads", kv_o, heads, "num_heads", &kv_heads))
        return -1;
    if (!kv_len_o && kv_seq != seq && PyArray_DIM(k, 0) == batch) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'k' has %" NPY_INTP_FMT " keys per item for %"
                            NPY_INTP_FMT " queries: only the forward takes a KV cache (k longer "
                            "than q); the backward needs k.shape[1] = q.shape[1]",
                     func, kv_seq, seq);
        return -1;
    }
    if (kv_len_o && kv_seq < seq) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'k' must have shape (batch, kv_seq, "
                            "num_kv_heads*head_dim) with kv_seq >= seq = %" NPY_INTP_FMT
                            ", got kv_seq = %" NPY_INTP_FMT,
                     func, seq, kv_seq);
        return -1;
    }
    npy_intp want_k[3] = {batch, kv_len_o ? kv_seq : seq, kv_heads * (hq / heads)};
    if (check_shape(c, "k", k, 3, want_k, kv_len_o ? "(batch, kv_seq, num_kv_heads*head_dim)"
                                                 : "(batch, seq, num_kv_heads*head_dim)") ||
        check_same_shape(c, "v", v, k, "k.shape"))
        return -1;
    long long kv_len = kv_seq;
    if (kv_len_o && kv_len_o != Py_None &&
        arg_int(PREFIX, func, "kv_len", kv_len_o, seq, kv_seq, &kv_len))
        return -1;
    npy_intp mask_ld = kv_len;
    if (mask_o != Py_None) {
        if (!PyArray_Check(mask_o) || !(PyArray_ISBOOL((PyArrayObject *)mask_o) ||
                                        PyArray_ISINTEGER((PyArrayObject *)mask_o))) {
            PyErr_Format(PyExc_TypeError,
                         PREFIX "%s: argument 'key_mask' must be None or a numpy.ndarray of "
                                "bool or integer dtype, got %s",
                         func, PyArray_Check(mask_o) ? "an array of another dtype"
                                                    : Py_TYPE(mask_o)->tp_name);
            return -1;
        }
        PyArrayObject *m = (PyArrayObject *)mask_o;
        npy_intp want_m[2] = {batch, (npy_intp)kv_len};
        if (PyArray_NDIM(m) == 2 && PyArray_DIM(m, 0) == batch && PyArray_DIM(m, 1) == kv_seq)
            mask_ld = kv_seq;
        else if (check_shape(c, "key_mask", m, 2, want_m,
                             kv_len_o ? "(batch, kv_len) or (batch, kv_seq)" : "(batch, seq)"))
            return -1;
    }
    *d = (LoraGqaDims){(size_t)batch,    (size_t)seq,    (size_t)heads,
                       (size_t)kv_heads, (size_t)(hq / heads), (size_t)kv_seq,
                       (size_t)kv_len,   (size_t)mask_ld};
    *scale = 1.0 / sqrt((double)d->head_dim);
    if (scale_o != Py_None && arg_real(c, "scale", scale_o, REAL_ANY, scale)) return -1;
    *mask = NULL;
    if (mask_o == Py_None) return 0;
    *mask = (PyArrayObject *)PyArray_FromAny(mask_o, PyArray_DescrFromType(NPY_BOOL), 2, 2,
                                             NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST, NULL);
    return *mask ? call_hold(c, mask, 0) : -1;
}

LORA_DOC(causal_attention_forward,
"causal_attention_forward(q, k, v, num_heads, num_kv_heads, *, key_mask=None, scale=None,\n"
"kv_len=None)\n--\n\n"
"Causal grouped-query attention on the layout the projections write: query head h (the\n"
"column block ``[h*head_dim, (h+1)*head_dim)`` of q) attends to kv head\n"
"``h // (num_heads // num_kv_heads)`` of k and v, at keys up to its own position:\n"
"``ctx_h = softmax(scale * q_h k_g^T + causal mask + key mask) v_g``. Tiled with an online\n"
"softmax (FlashAttention-2): no seq x seq matrix is formed.\n\n"
"k and v may be a KV cache longer than q: of their kv_seq rows per item the first kv_len\n"
"are the keys (the rest is never read, so a preallocated cache is passed as it is), and\n"
"the q rows are positions ``kv_len - seq .. kv_len - 1``. A cached call has no backward.\n\n"
"Parameters\n----------\n"
"q : ndarray, shape (batch, seq, num_heads*head_dim)\n"
"k, v : ndarray, shape (batch, kv_seq, num_kv_heads*head_dim), kv_seq >= seq\n"
"num_heads : int, divides q.shape[2]\nnum_kv_heads : int, divides num_heads\n"
"key_mask : ndarray of bool or int, shape (batch, kv_len) or (batch, kv_seq), optional\n"
"    Nonzero where a key may be attended to (an attention_mask). A query with no key left\n"
"    (a padded position of a left-padded batch) gets ctx 0.\n"
"scale : float, default 1 / sqrt(head_dim)\n"
"kv_len : int in [seq, kv_seq], default kv_seq\n"
"    The keys of the cache filled so far.\n\n"
"Returns\n-------\n"
"ctx : ndarray, shape (batch, seq, num_heads*head_dim)\n"
"lse : ndarray, shape (batch, num_heads, seq)\n"
"    log(sum(exp(scores))) per query row (-inf for a row with no key), kept for the\n"
"    backward.");

PyObject *py_causal_attention_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"q", "k", "v", "num_heads", "num_kv_heads", "key_mask", "scale",
                             "kv_len", NULL};
    PyObject *q_o, *k_o, *v_o, *heads_o, *kv_o, *mask_o = Py_None, *scale_o = Py_None;
    PyObject *kv_len_o = Py_None;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|$OOO:causal_attention_forward", kwlist,
                                     &q_o, &k_o, &v_o, &heads_o, &kv_o, &mask_o, &scale_o,
                                     &kv_len_o))
        return NULL;
    Call c = CALL_INIT("causal_attention_forward", "q");
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *mask = NULL, *ctx = NULL, *lse = NULL;
    PyObject *result = NULL;
    LoraGqaDims d;
    double scale;
    void *scratch;
    if (arg_array(&c, &q, "q", q_o) || arg_array(&c, &k, "k", k_o) ||
        arg_array(&c, &v, "v", v_o) ||
        causal_args(&c, q, k, v, heads_o, kv_o, mask_o, scale_o, kv_len_o, &d, &mask,
                    &scale) ||
        call_carrays(&c))
        goto done;
    npy_intp ldims[3] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq};
    const size_t parts = lora_causal_attention_parts(&d, 0), elem = PyArray_ITEMSIZE(q);
    if (call_new(&c, &ctx, 3, PyArray_DIMS(q)) || call_new(&c, &lse, 3, ldims) ||
        !(scratch = call_scratch_bytes(&c, lora_causal_attention_scratch_bytes(&d, elem, parts))))
        goto done;
    CALL_KERNEL(&c, causal_attention_forward, PyArray_DATA(ctx), PyArray_DATA(lse), scratch,
                PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), DATA_OR_NULL(mask), scale, &d,
                parts);
    result = Py_BuildValue("(OO)", ctx, lse);
done:
    return call_end(&c, result);
}

LORA_DOC(causal_attention_backward,
"causal_attention_backward(dctx, q, k, v, ctx, lse, num_heads, num_kv_heads, *, "
"key_mask=None, scale=None)\n--\n\n"
"Backward of causal_attention_forward, with the same q, k, v, num_heads, num_kv_heads,\n"
"key_mask and scale and its ctx and lse. The probabilities are recomputed tile by tile from\n"
"lse; ``dS = P * (dctx v^T - rowsum(dctx * ctx))``, ``dq = scale dS k``, ``dk = scale dS^T q``,\n"
"``dv = P^T dctx``, summed over the query heads sharing a kv head.\n\n"
"Returns\n-------\n"
"dq : ndarray, shape (batch, seq, num_heads*head_dim)\n"
"dk, dv : ndarray, shape (batch, seq, num_kv_heads*head_dim)");

PyObject *py_causal_attention_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dctx", "q", "k", "v", "ctx", "lse", "num_heads", "num_kv_heads",
                             "key_mask", "scale", NULL};
    PyObject *dctx_o, *q_o, *k_o, *v_o, *ctx_o, *lse_o, *heads_o, *kv_o, *mask_o = Py_None,
                                                                          *scale_o = Py_None;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOO|$OO:causal_attention_backward",
                                     kwlist, &dctx_o, &q_o, &k_o, &v_o, &ctx_o, &lse_o, &heads_o,
                                     &kv_o, &mask_o, &scale_o))
        return NULL;
    Call c = CALL_INIT("causal_attention_backward", "dctx");
    PyArrayObject *dctx = NULL, *q = NULL, *k = NULL, *v = NULL, *ctx = NULL, *lse = NULL;
    PyArrayObject *mask = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
    PyObject *result = NULL;
    LoraGqaDims d;
    double scale;
    void *scratch;
    if (arg_array(&c, &dctx, "dctx", dctx_o) || arg_array(&c, &q, "q", q_o) ||
        arg_array(&c, &k, "k", k_o) || arg_array(&c, &v, "v", v_o) ||
        arg_array(&c, &ctx, "ctx", ctx_o) || arg_array(&c, &lse, "lse", lse_o) ||
        causal_args(&c, q, k, v, heads_o, kv_o, mask_o, scale_o, NULL, &d, &mask,
                    &scale))
        goto done;
    npy_intp ldims[3] = {(npy_intp)d.batch, (npy_intp)d.heads, (npy_intp)d.seq};
    const size_t parts = lora_causal_attention_parts(&d, 1), elem = PyArray_ITEMSIZE(q);
    if (check_same_shape(&c, "dctx", dctx, q, "q.shape") ||
        check_same_shape(&c, "ctx", ctx, q, "q.shape") ||
        check_shape(&c, "lse", lse, 3, ldims, "(batch, num_heads, seq)") || call_carrays(&c) ||
        call_new(&c, &dq, 3, PyArray_DIMS(q)) || call_new(&c, &dk, 3, PyArray_DIMS(k)) ||
        call_new(&c, &dv, 3, PyArray_DIMS(k)) ||
        !(scratch = call_scratch_bytes(&c, lora_causal_attention_scratch_bytes(&d, elem, parts))))
        goto done;
    CALL_KERNEL(&c, causal_attention_backward, PyArray_DATA(dq), PyArray_DATA(dk),
                PyArray_DATA(dv), scratch, PyArray_DATA(dctx), PyArray_DATA(q), PyArray_DATA(k),
                PyArray_DATA(v), PyArray_DATA(ctx), PyArray_DATA(lse), DATA_OR_NULL(mask), scale,
                &d, parts);
    result = Py_BuildValue("(OOO)", dq, dk, dv);
done:
    return call_end(&c, result);
}
