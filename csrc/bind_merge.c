/* bind_merge.c: the bindings of merge and unmerge, which add (or subtract) a LoRA update
 * to the weight in place, W += scale * B A (kernel: lora_merge in csrc/kernels/lora.c).
 *
 * The weight is updated in place and so is rejected, never copied, unless writeable,
 * aligned, native-order and C-contiguous; A and B are read only. The two functions differ
 * only in the sign of the scale.
 */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "kernels.h"

static PyObject *merge_impl(const char *func, double sign, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"weight", "A", "B", "scale", "fan_in_fan_out", NULL};
    PyObject *w_o, *a_o, *b_o, *scale_o;
    int fan_in_fan_out = 0;
    /* the format names the function in PyArg's own errors: "OOOO|$p:merge" */
    char format[32];
    snprintf(format, sizeof format, "OOOO|$p:%s", func);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, format, kwlist, &w_o, &a_o, &b_o, &scale_o,
                                     &fan_in_fan_out))
        return NULL;
    Call c = CALL_INIT(func, "weight");
    PyArrayObject *weight = NULL, *A = NULL, *B = NULL;
    PyObject *result = NULL;
    void *scratch = NULL;
    double scale;
    if (arg_inplace(&c, &weight, "weight", w_o) || arg_array(&c, &A, "A", a_o) ||
        arg_array(&c, &B, "B", b_o) || check_ndim(&c, "weight", weight, 2, 0) ||
        check_ndim(&c, "A", A, 2, 0) || check_ndim(&c, "B", B, 2, 0))
        goto done;
    /* With fan_in_fan_out the weight is stored (d_in, d_out); A and B keep their shapes. */
    npy_intp d_in = PyArray_DIM(A, 1), d_out = PyArray_DIM(B, 0), r = PyArray_DIM(A, 0);
    npy_intp want_w[2] = {d_out, d_in}, want_wt[2] = {d_in, d_out}, want_b[2] = {d_out, r};
    if (check_blas_size(&c, "A", "the rank r (A.shape[0])", r, 1) ||
        check_blas_size(&c, "A", "d_in (A.shape[1])", d_in, 1) ||
        check_blas_size(&c, "B", "d_out (B.shape[0])", d_out, 1) ||
        (fan_in_fan_out ? check_shape(&c, "weight", weight, 2, want_wt,
                                      "(d_in, d_out) with fan_in_fan_out")
                        : check_shape(&c, "weight", weight, 2, want_w, "(d_out, d_in)")) ||
        check_shape(&c, "B", B, 2, want_b, "(d_out, r)") ||
        arg_real(&c, "scale", scale_o, REAL_ANY, &scale) ||
        check_no_overlap(&c, "weight", weight, "A", A) ||
        check_no_overlap(&c, "weight", weight, "B", B) || call_carrays(&c))
        goto done;
    if (fan_in_fan_out && !(scratch = call_scratch(&c, (size_t)(r * d_out)))) goto done;

    CALL_KERNEL(&c, lora_merge, PyArray_DATA(weight), scratch, PyArray_DATA(A), PyArray_DATA(B),
                sign * scale, fan_in_fan_out, d_out, d_in, r);
    result = Py_NewRef(weight);
done:
    return call_end(&c, result);
}

LORA_DOC(merge,
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

PyObject *py_merge(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return merge_impl("merge", 1.0, args, kwds);
}

LORA_DOC(unmerge,
"unmerge(weight, A, B, scale, *, fan_in_fan_out=False)\n--\n\n"
"Undo merge in place: ``weight -= scale * B @ A``. Arguments as for merge.\n\n"
"Returns\n-------\nweight : the same array, updated.");

PyObject *py_unmerge(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    return merge_impl("unmerge", -1.0, args, kwds);
}
