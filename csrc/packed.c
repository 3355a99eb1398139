/* packed.c: the PackedWeight type (lora.functional.PackedWeight) and the `weight` argument
 * of the linear and dense bindings, which takes an array or a PackedWeight.
 *
 * A PackedWeight is a frozen weight copied once into the panels that lora's packed GEMM reads
 * (csrc/kernels/panel_gemm.c): W^T's for forwards and, with backward=True, W's for the input
 * gradients. The object keeps no reference to the weight it was made from; its panels are
 * read-only arrays, so a PackedWeight never changes after it is made. This file deliberately
 * holds no binding of a kernel: those are in bind_*.c.
 */
#include "py_common.h"

#include "args.h"
#include "packed.h"
#include "scratch.h"

/* d_out and d_in from a 2-D weight: (d_out, d_in), or (d_in, d_out) when wt (fan_in_fan_out). */
static int check_weight_dims(const Call *c, PyArrayObject *weight, int wt, npy_intp *d_out,
                             npy_intp *d_in) {
    *d_out = PyArray_DIM(weight, wt ? 1 : 0);
    *d_in = PyArray_DIM(weight, wt ? 0 : 1);
    return check_blas_size(c, "weight", wt ? "d_out (weight.shape[1], fan_in_fan_out)"
                                           : "d_out (weight.shape[0])", *d_out, 1) ||
           check_blas_size(c, "weight", wt ? "d_in (weight.shape[0], fan_in_fan_out)"
                                           : "d_in (weight.shape[1])", *d_in, 1);
}

/* A 2-D weight array into *slot (held by the Call), with d_out and d_in from its shape. */
static int arg_weight_array(Call *c, PyArrayObject **slot, PyObject *obj, int wt,
                            npy_intp *d_out, npy_intp *d_in) {
    return arg_array(c, slot, "weight", obj) || check_ndim(c, "weight", *slot, 2, 0) ||
           check_weight_dims(c, *slot, wt, d_out, d_in);
}

static PyArrayObject *new_panels(npy_intp N, npy_intp K, int type) {
    const npy_intp width = LORA_PANEL_BYTES / (type == NPY_FLOAT32 ? 4 : 8);
    npy_intp dims[3] = {(N + width - 1) / width, K, width};
    return (PyArrayObject *)PyArray_SimpleNew(3, dims, type);
}

static PyObject *packed_new(PyTypeObject *cls, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"weight", "fan_in_fan_out", "backward", NULL};
    PyObject *w_o;
    int wt = 0, backward = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$pp:PackedWeight", kwlist, &w_o, &wt,
                                     &backward))
        return NULL;
    Call c = CALL_INIT("PackedWeight", "weight");
    PyArrayObject *weight = NULL;
    PackedWeight *self = NULL;
    npy_intp d_out, d_in;
    if (arg_weight_array(&c, &weight, w_o, wt, &d_out, &d_in) || call_carrays(&c)) goto done;
    if (!(self = (PackedWeight *)cls->tp_alloc(cls, 0))) goto done;
    self->d_out = d_out, self->d_in = d_in, self->type = c.type;
    if (!(self->fwd = new_panels(d_out, d_in, c.type)) ||
        (backward && !(self->bwd = new_panels(d_in, d_out, c.type)))) {
        Py_CLEAR(self);
        goto done;
    }
    /* forward: panels of W^T (d_in, d_out); backward: of W (d_out, d_in) */
    void *fwd = PyArray_DATA(self->fwd), *bwd = self->bwd ? PyArray_DATA(self->bwd) : NULL;
    const void *w = PyArray_DATA(weight);
    Py_BEGIN_ALLOW_THREADS;
    if (c.type == NPY_FLOAT32) {
        pack_panels_f32(fwd, w, d_in, d_out, !wt);
        if (bwd) pack_panels_f32(bwd, w, d_out, d_in, wt);
    } else {
        pack_panels_f64(fwd, w, d_in, d_out, !wt);
        if (bwd) pack_panels_f64(bwd, w, d_out, d_in, wt);
    }
    Py_END_ALLOW_THREADS;
    PyArray_CLEARFLAGS(self->fwd, NPY_ARRAY_WRITEABLE);
    if (self->bwd) PyArray_CLEARFLAGS(self->bwd, NPY_ARRAY_WRITEABLE);
done:
    return call_end(&c, (PyObject *)self);
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

PyTypeObject PackedWeightType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lora.functional.PackedWeight",
    .tp_basicsize = sizeof(PackedWeight),
    .tp_dealloc = (destructor)packed_dealloc,
    .tp_repr = (reprfunc)packed_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = packed_doc,
    .tp_getset = packed_getset,
    .tp_new = packed_new,
};

int arg_weight(Call *c, PyObject *obj, int wt, int direction, WeightArg *w) {
    const char *func = c->func;
    *w = (WeightArg){NULL, NULL, NULL, direction, 0, 0, {NULL, NULL, 0, 0}, NULL};
    if (PyObject_TypeCheck(obj, &QuantWeightType)) {
        if (wt) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: fan_in_fan_out must be False with a QuantWeight (it is "
                                "(d_out, d_in)), got True",
                         func);
            return -1;
        }
        QuantWeight *qw = (QuantWeight *)obj;
        w->d_out = qw->d_out, w->d_in = qw->d_in;
        w->quant = qw;
        c->obj = Py_NewRef(obj);
        return 0;
    }
    if (!PyObject_TypeCheck(obj, &PackedWeightType))
        return arg_weight_array(c, &w->array, obj, wt, &w->d_out, &w->d_in);
    PackedWeight *pw = (PackedWeight *)obj;
    if (c->type >= 0 && pw->type != c->type) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'weight' must have dtype %s (the dtype of '%s'), got a "
                            "PackedWeight of %s",
                     func, type_name(c->type), c->type_ref, type_name(pw->type));
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
    c->type = pw->type;
    w->d_out = pw->d_out, w->d_in = pw->d_in;
    w->packed = pw;
    c->obj = Py_NewRef(obj);
    return 0;
}

int weight_panels(Call *c, WeightArg *w, npy_intp n) {
    if (w->quant && w->direction >= 0) {
        LoraPacked *pk = &w->pk;
        const size_t elem = c->type == NPY_FLOAT32 ? 4 : 8;
        const size_t tile = lora_quant_scratch_elems((size_t)n, (size_t)w->d_in,
                                                     (size_t)w->d_out, elem, w->direction,
                                                     w->quant->act8);
        pk->panels = PyArray_DATA(w->quant->data);
        pk->qtype = w->quant->qtype;
        pk->act8 = w->quant->act8;
        if (tile && !(pk->xp = call_scratch(c, tile))) return -1;
        w->kernel = pk;
        return 0;
    }
    if (!w->packed || w->direction < 0) return 0;
    PyArrayObject *panels = w->direction ? w->packed->bwd : w->packed->fwd;
    LoraPacked *pk = &w->pk;
    pk->panels = PyArray_DATA(panels);
    pk->parts = lora_panel_parts((size_t)PyArray_DIM(panels, 0));
    const size_t K = (size_t)PyArray_DIM(panels, 1), elem = c->type == NPY_FLOAT32 ? 4 : 8;
    if (!(pk->xp = call_scratch(c, lora_panel_scratch_elems(pk->parts, (size_t)n, K, elem))))
        return -1;
    w->kernel = pk;
    return 0;
}
