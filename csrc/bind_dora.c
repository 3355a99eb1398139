/* bind_dora.c: the binding of dora_norm, DoRA's per-row norm of the adapted weight,
 * ||W + scale B A|| (kernel: dora_norm in csrc/kernels/dora_impl.h).
 *
 * The weight is read only and may be an array (either layout), a PackedWeight or a
 * QuantWeight, as the weight of linear_forward; for the last two ||W_j||^2 must be given
 * (weight_sqnorm), since their rows are not an array the kernel can read.
 */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "kernels.h"
#include "packed.h"

LORA_DOC(dora_norm,
"dora_norm(weight, A, B, scale, *, fan_in_fan_out=False, weight_sqnorm=None)\n--\n\n"
"DoRA's weight norm (Liu et al. 2024): ``norm[j] = ||weight[j] + scale * (B @ A)[j]||``\n"
"for every output row j, computed without forming ``weight + scale * B @ A``: one\n"
"product of A's r rows with the weight and A @ A.T, O(r d_in d_out) flops and\n"
"O(r d_out) memory.\n\n"
"Parameters\n----------\n"
"weight : ndarray, shape (d_out, d_in) ((d_in, d_out) when fan_in_fan_out), a\n"
"    PackedWeight or a QuantWeight\n"
"A : ndarray, shape (r, d_in)\n"
"B : ndarray, shape (d_out, r)\n"
"scale : float\n"
"fan_in_fan_out : bool\n    The weight array is stored (d_in, d_out); the norm is still per output.\n"
"weight_sqnorm : ndarray, shape (d_out,), optional\n"
"    ``||weight[j]||^2``, constant for a frozen weight; required for a PackedWeight or\n"
"    QuantWeight, computed from the array otherwise.\n\n"
"Returns\n-------\nnorm : ndarray, shape (d_out,)");

PyObject *py_dora_norm(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"weight", "A", "B", "scale", "fan_in_fan_out", "weight_sqnorm",
                             NULL};
    PyObject *w_o, *a_o, *b_o, *scale_o, *sq_o = Py_None;
    int wt = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$pO:dora_norm", kwlist, &w_o, &a_o, &b_o,
                                     &scale_o, &wt, &sq_o))
        return NULL;
    Call c = CALL_INIT("dora_norm", "A");
    PyArrayObject *A = NULL, *B = NULL, *sq = NULL, *norm = NULL;
    PyObject *result = NULL;
    WeightArg w;
    double scale;
    void *scratch;
    if (arg_array(&c, &A, "A", a_o) || arg_weight(&c, w_o, wt, 0, &w) ||
        arg_array(&c, &B, "B", b_o) || arg_optional(&c, &sq, "weight_sqnorm", sq_o))
        goto done;
    const npy_intp d_out = w.d_out, d_in = w.d_in;
    npy_intp r;
    if (check_lora_pair(&c, A, B, d_out, d_in, &r) ||
        (sq && check_shape(&c, "weight_sqnorm", sq, 1, &d_out, "(d_out,)")) ||
        arg_real(&c, "scale", scale_o, REAL_ANY, &scale))
        goto done;
    if (!sq && !w.array) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "dora_norm: argument 'weight_sqnorm' is required when the weight is "
                     "a PackedWeight or QuantWeight (its rows are not an array to read)");
        goto done;
    }
    if (call_carrays(&c) || call_new(&c, &norm, 1, &d_out) ||
        !(scratch = call_scratch(&c, (size_t)(r * d_out + r * r + d_out))) ||
        weight_panels(&c, &w, r))
        goto done;
    CALL_KERNEL(&c, dora_norm, PyArray_DATA(norm), scratch, weight_data(&w), PyArray_DATA(A),
                PyArray_DATA(B), scale, DATA_OR_NULL(sq), d_out, d_in, r, wt, w.kernel);
    result = Py_NewRef(norm);
done:
    return call_end(&c, result);
}
