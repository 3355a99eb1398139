/* bind_linear.c: the bindings of the linear layers: linear_forward / linear_backward (a LoRA
 * layer) and dense_forward / dense_backward (a plain one), whose weight may be a PackedWeight.
 *
 * Each reads: parse, validate every argument (args.h), allocate outputs and scratch, run the
 * kernel with the GIL released (CALL_KERNEL), and release everything at `done`. The shape
 * checks the four share (x, the LoRA factors, residual and add_dx_to) are here; the
 * kernels are csrc/kernels/lora.c.
 */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "kernels.h"
#include "packed.h"

/* The shapes of a LoRA layer: weight (d_out, d_in) (or (d_in, d_out) when fan_in_fan_out),
 * A (r, d_in), B (d_out, r). */
typedef struct {
    npy_intp d_out, d_in, r;
} LoraDims;

/* What linear_forward and linear_backward share beyond their arrays. */
typedef struct {
    WeightArg w;
    LoraDims dm;
    npy_intp n;      /* rows of x */
    double scale, p; /* the LoRA scaling and the dropout probability */
    uint64_t seed;
} LoraArgs;

/* The weight (already fetched into la->w), A, B and x against each other; fills la->dm. */
static int check_lora(const Call *c, LoraArgs *la, PyArrayObject *A, PyArrayObject *B,
                      PyArrayObject *x) {
    la->dm.d_out = la->w.d_out, la->dm.d_in = la->w.d_in;
    return check_lora_pair(c, A, B, la->dm.d_out, la->dm.d_in, &la->dm.r) ||
           check_x(c, x, la->dm.d_in);
}

/* scale, dropout and seed. */
static int arg_lora_reals(const Call *c, LoraArgs *la, PyObject *scale_o, PyObject *drop_o,
                          PyObject *seed_o) {
    return arg_real(c, "scale", scale_o, REAL_ANY, &la->scale) ||
           arg_dropout(c, drop_o, seed_o, &la->p, &la->seed);
}

/* The optional `residual` of the forwards: y's shape ((..., d_out), the leading dims of x),
 * read only; *slot NULL for None. */
static int arg_residual(Call *c, PyArrayObject **slot, PyObject *obj, PyArrayObject *x,
                        npy_intp d_out) {
    return arg_optional(c, slot, "residual", obj) ||
           (*slot &&
            check_rows_like(c, "residual", *slot, x, d_out, "(..., d_out), the shape of y"));
}

/* The optional `add_dx_to` of the backwards: dx's shape, updated in place (dx is added to
 * it), so writeable and C-contiguous, sharing no memory with any of the n_inputs inputs, and
 * only with need_dx; *slot NULL for None. */
static int arg_add_dx_to(Call *c, PyArrayObject **slot, PyObject *obj, int need_dx,
                         PyArrayObject *x, npy_intp d_in, PyArrayObject **inputs,
                         const char **names, int n_inputs) {
    *slot = NULL;
    if (obj == Py_None) return 0;
    if (!need_dx) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'add_dx_to' needs need_dx=True, got need_dx=False",
                     c->func);
        return -1;
    }
    if (arg_inplace(c, slot, "add_dx_to", obj) ||
        check_rows_like(c, "add_dx_to", *slot, x, d_in, "(..., d_in), the shape of dx"))
        return -1;
    for (int i = 0; i < n_inputs; i++)
        if (check_no_overlap(c, "add_dx_to", *slot, names[i], inputs[i])) return -1;
    return 0;
}

/* ------------------------------------------------------------------ linear_forward */

LORA_DOC(linear_forward,
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

PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x",    "weight",  "A",    "B",           "scale",
                             "bias", "dropout", "seed", "fan_in_fan_out", "residual", NULL};
    PyObject *x_o, *w_o, *a_o, *b_o, *scale_o, *bias_o = Py_None, *drop_o = NULL, *seed_o = NULL;
    PyObject *res_o = Py_None;
    int wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO|O$OOpO:linear_forward", kwlist, &x_o,
                                     &w_o, &a_o, &b_o, &scale_o, &bias_o, &drop_o, &seed_o, &wt,
                                     &res_o))
        return NULL;
    Call c = CALL_INIT("linear_forward", "x");
    PyArrayObject *x = NULL, *A = NULL, *B = NULL, *bias = NULL, *res = NULL;
    PyArrayObject *y = NULL, *xa = NULL;
    PyObject *result = NULL;
    LoraArgs la;
    const LoraDims *dm = &la.dm;
    void *scratch;
    if (arg_array(&c, &x, "x", x_o) || arg_weight(&c, w_o, wt, 0, &la.w) ||
        arg_array(&c, &A, "A", a_o) || arg_array(&c, &B, "B", b_o) ||
        arg_optional(&c, &bias, "bias", bias_o) || check_lora(&c, &la, A, B, x) ||
        count_rows(&c, x, &la.n) ||
        (bias && check_shape(&c, "bias", bias, 1, &dm->d_out, "(d_out,)")) ||
        arg_residual(&c, &res, res_o, x, dm->d_out) ||
        arg_lora_reals(&c, &la, scale_o, drop_o, seed_o) || call_carrays(&c))
        goto done;

    const npy_intp n = la.n;
    if (call_new_rows(&c, &y, x, dm->d_out) || call_new_rows(&c, &xa, x, dm->r) ||
        !(scratch = call_scratch(&c, lora_scratch_elems(n, dm->d_in, dm->d_out, dm->r, la.p > 0,
                                                        1))) ||
        weight_panels(&c, &la.w, n))
        goto done;

    CALL_KERNEL(&c, lora_forward, PyArray_DATA(y), PyArray_DATA(xa), scratch, PyArray_DATA(x),
                weight_data(&la.w), DATA_OR_NULL(bias), DATA_OR_NULL(res), PyArray_DATA(A),
                PyArray_DATA(B), la.scale, la.p, la.seed, n, dm->d_in, dm->d_out, dm->r, wt,
                la.w.kernel);
    result = Py_BuildValue("(OO)", y, xa);
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ linear_backward */

LORA_DOC(linear_backward,
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

PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy",      "x",       "xa",      "weight", "A",
                             "B",       "scale",   "need_dx", "dropout", "seed",
                             "fan_in_fan_out", "add_dx_to", NULL};
    PyObject *dy_o, *x_o, *xa_o, *w_o, *a_o, *b_o, *scale_o, *drop_o = NULL, *seed_o = NULL;
    PyObject *acc_o = Py_None;
    int need_dx = 1, wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO|$pOOpO:linear_backward", kwlist,
                                     &dy_o, &x_o, &xa_o, &w_o, &a_o, &b_o, &scale_o, &need_dx,
                                     &drop_o, &seed_o, &wt, &acc_o))
        return NULL;
    Call c = CALL_INIT("linear_backward", "dy");
    PyArrayObject *dy = NULL, *x = NULL, *xa = NULL, *A = NULL, *B = NULL;
    PyArrayObject *dx = NULL, *dA = NULL, *dB = NULL;
    PyObject *result = NULL;
    LoraArgs la;
    const LoraDims *dm = &la.dm;
    void *scratch;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &x, "x", x_o) ||
        arg_array(&c, &xa, "xa", xa_o) || arg_weight(&c, w_o, wt, need_dx ? 1 : -1, &la.w) ||
        arg_array(&c, &A, "A", a_o) || arg_array(&c, &B, "B", b_o) ||
        check_lora(&c, &la, A, B, x) ||
        check_rows_like(&c, "dy", dy, x, dm->d_out, "(..., d_out) with the leading dims of x") ||
        check_rows_like(&c, "xa", xa, x, dm->r, "(..., r) with the leading dims of x") ||
        count_rows(&c, x, &la.n) || arg_lora_reals(&c, &la, scale_o, drop_o, seed_o))
        goto done;
    PyArrayObject *inputs[] = {dy, x, xa, A, B, la.w.array};
    const char *names[] = {"dy", "x", "xa", "A", "B", "weight"};
    if (arg_add_dx_to(&c, &dx, acc_o, need_dx, x, dm->d_in, inputs, names,
                      la.w.array ? 6 : 5) ||
        call_carrays(&c))
        goto done;
    const int acc = dx != NULL;

    const npy_intp n = la.n, a_dims[2] = {dm->r, dm->d_in}, b_dims[2] = {dm->d_out, dm->r};
    const size_t parts = lora_backward_parts((size_t)n, (size_t)dm->d_in, (size_t)dm->d_out);
    if ((need_dx && !dx && call_new_rows(&c, &dx, x, dm->d_in)) ||
        call_new(&c, &dA, 2, a_dims) || call_new(&c, &dB, 2, b_dims) ||
        !(scratch = call_scratch(&c, lora_scratch_elems(n, dm->d_in, dm->d_out, dm->r, la.p > 0,
                                                        parts))) ||
        weight_panels(&c, &la.w, n))
        goto done;

    CALL_KERNEL(&c, lora_backward, DATA_OR_NULL(dx), PyArray_DATA(dA), PyArray_DATA(dB),
                scratch, PyArray_DATA(dy), PyArray_DATA(x), PyArray_DATA(xa),
                weight_data(&la.w), PyArray_DATA(A), PyArray_DATA(B), la.scale, la.p, la.seed,
                n, dm->d_in, dm->d_out, dm->r, parts, wt, acc, la.w.kernel);
    result = Py_BuildValue("(OOO)", OR_NONE(dx), dA, dB);
done:
    return call_end(&c, result);
}

/* ------------------------------------------------------------------ dense forward/backward */

LORA_DOC(dense_forward,
"dense_forward(x, weight, bias=None, *, fan_in_fan_out=False, residual=None)\n--\n\n"
"A plain linear layer: ``y = x @ weight.T + bias (+ residual)`` (``x @ weight + ...``\n"
"when fan_in_fan_out: weight stored (d_in, d_out), as GPT-2's Conv1D, read in place).\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (..., d_in)\nweight : ndarray, shape (d_out, d_in) or (d_in, d_out)\n"
"bias : ndarray, shape (d_out,), optional\nfan_in_fan_out : bool\n"
"residual : ndarray, shape (..., d_out), optional\n"
"    Added to y in the pass that writes the bias (no extra pass over memory).\n\n"
"Returns\n-------\ny : ndarray, shape (..., d_out)");

PyObject *py_dense_forward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "weight", "bias", "fan_in_fan_out", "residual", NULL};
    PyObject *x_o, *w_o, *bias_o = Py_None, *res_o = Py_None;
    int wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$pO:dense_forward", kwlist, &x_o, &w_o,
                                     &bias_o, &wt, &res_o))
        return NULL;
    Call c = CALL_INIT("dense_forward", "x");
    PyArrayObject *x = NULL, *bias = NULL, *res = NULL, *y = NULL;
    PyObject *result = NULL;
    WeightArg w;
    npy_intp n;
    if (arg_array(&c, &x, "x", x_o) || arg_weight(&c, w_o, wt, 0, &w) ||
        arg_optional(&c, &bias, "bias", bias_o) || check_x(&c, x, w.d_in) ||
        count_rows(&c, x, &n) ||
        (bias && check_shape(&c, "bias", bias, 1, &w.d_out, "(d_out,)")) ||
        arg_residual(&c, &res, res_o, x, w.d_out) || call_carrays(&c))
        goto done;
    if (call_new_rows(&c, &y, x, w.d_out) || weight_panels(&c, &w, n)) goto done;

    CALL_KERNEL(&c, dense_forward, PyArray_DATA(y), PyArray_DATA(x), weight_data(&w),
                DATA_OR_NULL(bias), DATA_OR_NULL(res), n, w.d_in, w.d_out, wt, w.kernel);
    result = Py_NewRef(y);
done:
    return call_end(&c, result);
}

LORA_DOC(dense_backward,
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

PyObject *py_dense_backward(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"dy",           "x",              "weight",    "need_dx",
                             "need_dweight", "fan_in_fan_out", "add_dx_to", NULL};
    PyObject *dy_o, *x_o, *w_o, *acc_o = Py_None;
    int need_dx = 1, need_dw = 1, wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$pppO:dense_backward", kwlist, &dy_o, &x_o,
                                     &w_o, &need_dx, &need_dw, &wt, &acc_o))
        return NULL;
    Call c = CALL_INIT("dense_backward", "dy");
    PyArrayObject *dy = NULL, *x = NULL, *dx = NULL, *dW = NULL;
    PyObject *result = NULL;
    WeightArg w;
    npy_intp n;
    if (arg_array(&c, &dy, "dy", dy_o) || arg_array(&c, &x, "x", x_o) ||
        arg_weight(&c, w_o, wt, need_dx ? 1 : -1, &w) || check_x(&c, x, w.d_in) ||
        check_rows_like(&c, "dy", dy, x, w.d_out, "(..., d_out) with the leading dims of x") ||
        count_rows(&c, x, &n))
        goto done;
    PyArrayObject *inputs[] = {dy, x, w.array};
    const char *names[] = {"dy", "x", "weight"};
    if (arg_add_dx_to(&c, &dx, acc_o, need_dx, x, w.d_in, inputs, names, w.array ? 3 : 2) ||
        call_carrays(&c))
        goto done;
    const int acc = dx != NULL;

    npy_intp w_dims[2] = {wt ? w.d_in : w.d_out, wt ? w.d_out : w.d_in}; /* weight's layout */
    if ((need_dx && !dx && call_new_rows(&c, &dx, x, w.d_in)) ||
        (need_dw && call_new(&c, &dW, 2, w_dims)) || weight_panels(&c, &w, n))
        goto done;

    CALL_KERNEL(&c, dense_backward, DATA_OR_NULL(dx), DATA_OR_NULL(dW), PyArray_DATA(dy),
                PyArray_DATA(x), weight_data(&w), n, w.d_in, w.d_out, wt, acc, w.kernel);
    result = Py_BuildValue("(OO)", OR_NONE(dx), OR_NONE(dW));
done:
    return call_end(&c, result);
}
