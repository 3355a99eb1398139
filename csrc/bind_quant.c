/* bind_quant.c: quantized weights (kernels: csrc/kernels/quant.c). The bindings quantize and
 * dequantize, and the QuantWeight type: a frozen weight held as block bytes, which stands
 * wherever a weight goes in linear_forward, linear_backward, dense_forward and dense_backward
 * (packed.c's arg_weight takes it), so a LoRA layer runs over a quantized base unchanged.
 *
 * The block bytes are never copied: a QuantWeight keeps a reference to the uint8 array it is
 * given (a memory-mapped GGUF file's tensor, say) and only reads it.
 */
#include "py_common.h"

#include <math.h>
#include <string.h>

#include "args.h"
#include "bindings.h"
#include "kernels.h"
#include "packed.h"

/* qtype: a str naming a supported type (`writing`: one quantize can write). */
static int arg_qtype(const char *func, PyObject *obj, int writing, int *qtype) {
    const char *name = PyUnicode_Check(obj) ? PyUnicode_AsUTF8(obj) : NULL;
    if (!name) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, PREFIX "%s: argument 'qtype' must be a str, got %s", func,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *qtype = lora_qtype_from_name(name);
    if (!*qtype || (writing && !lora_qtype_writable(*qtype))) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'qtype' must be one of %s, got %R", func,
                     writing ? "'Q8_0', 'Q4_0', 'Q4_1', 'NF4', 'NF4_DQ'"
                             : "'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K', 'NF4', 'NF4_DQ'",
                     obj);
        return -1;
    }
    return 0;
}

/* The last dim of a tensor of `qtype` holds whole blocks. */
static int check_row(const char *func, const char *name, npy_intp last, int qtype) {
    const npy_intp e = (npy_intp)lora_qblock_elems(qtype);
    if (last <= 0 || last % e) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: the last dimension of '%s' must be a positive multiple of %zd "
                            "(a %s block), got %zd",
                     func, name, (Py_ssize_t)e, lora_qtype_name(qtype), (Py_ssize_t)last);
        return -1;
    }
    return 0;
}

/* A uint8 array (any shape, C-contiguous: the bytes in order), a new reference. */
static PyArrayObject *arg_bytes(const char *func, PyObject *obj) {
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_UINT8) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'data' must be a numpy.ndarray of dtype uint8 (the "
                            "block bytes), got %s",
                     func, PyArray_Check(obj) ? type_name(PyArray_TYPE((PyArrayObject *)obj))
                                              : Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'data' must be C-contiguous (the blocks in order)",
                     func);
        return NULL;
    }
    return (PyArrayObject *)Py_NewRef(obj);
}

/* shape: a tuple of positive ints whose last one holds whole blocks; *count its product. */
static int arg_shape(const char *func, PyObject *obj, int qtype, npy_intp *dims, int *nd,
                     npy_intp *count) {
    PyObject *seq = PySequence_Check(obj) ? PySequence_Fast(obj, "") : NULL;
    if (!seq || PySequence_Fast_GET_SIZE(seq) < 1 ||
        PySequence_Fast_GET_SIZE(seq) > NPY_MAXDIMS) {
        Py_XDECREF(seq);
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     PREFIX "%s: argument 'shape' must be a tuple of 1 to %d ints, got %R", func,
                     NPY_MAXDIMS, obj);
        return -1;
    }
    *nd = (int)PySequence_Fast_GET_SIZE(seq);
    *count = 1;
    for (int i = 0; i < *nd; i++) {
        long long v;
        if (arg_int(PREFIX, func, "shape", PySequence_Fast_GET_ITEM(seq, i), 0,
                    (long long)1 << 40, &v)) {
            Py_DECREF(seq);
            return -1;
        }
        dims[i] = (npy_intp)v;
        if (*count && dims[i] > NPY_MAX_INTP / *count) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, PREFIX "%s: argument 'shape' %R is too large", func,
                         obj);
            return -1;
        }
        *count *= dims[i];
    }
    Py_DECREF(seq);
    return check_row(func, "shape", dims[*nd - 1], qtype);
}

/* data holds exactly the rows of `count` elements, K a row. */
static int check_nbytes(const char *func, PyArrayObject *data, npy_intp count, npy_intp K,
                        int qtype) {
    const npy_intp rows = count / K, row_bytes = (npy_intp)lora_qrow_bytes(qtype, (size_t)K);
    if (PyArray_NBYTES(data) != rows * row_bytes) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: argument 'data' must hold %zd bytes (%zd rows of %zd %s "
                            "bytes for the shape given), got %zd",
                     func, (Py_ssize_t)(rows * row_bytes), (Py_ssize_t)rows,
                     (Py_ssize_t)row_bytes, lora_qtype_name(qtype),
                     (Py_ssize_t)PyArray_NBYTES(data));
        return -1;
    }
    return 0;
}

LORA_DOC(quantize,
"quantize(x, qtype)\n--\n\n"
"The blocks of ``x`` in a quantized format, as bytes.\n\n"
"Bit for bit what the PyPI ``gguf`` package's ``gguf.quants.quantize`` writes for Q8_0,\n"
"Q4_0 and Q4_1; NF4 is QLoRA's (blocks of 64, float32 absmax, the NormalFloat codes), NF4_DQ\n"
"the same with its absmax scales double-quantized to 8 bits per row (lora's layouts,\n"
"docs/quantization.md).\n\n"
"Parameters\n----------\n"
"x : ndarray of float32 or float64, shape (..., K), K a multiple of the block (32; NF4,\n"
"    NF4_DQ 64)\n"
"    Read as float32 (gguf.quants does the same). Must be finite.\n"
"qtype : {'Q8_0', 'Q4_0', 'Q4_1', 'NF4', 'NF4_DQ'}\n\n"
"Returns\n-------\ndata : ndarray of uint8, shape (..., row bytes)\n"
"    A row of K values takes ``lora.quant.row_bytes(qtype, K)`` bytes (K / block * block\n"
"    bytes, but for NF4_DQ).");

PyObject *py_quantize(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"x", "qtype", NULL};
    PyObject *x_o, *q_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:quantize", kwlist, &x_o, &q_o)) return NULL;
    int qtype;
    if (arg_qtype("quantize", q_o, 1, &qtype)) return NULL;
    if (!PyArray_Check(x_o) || !PyArray_ISFLOAT((PyArrayObject *)x_o)) {
        PyErr_Format(PyExc_TypeError,
                     PREFIX "quantize: argument 'x' must be a numpy.ndarray of float32 or "
                            "float64, got %s",
                     PyArray_Check(x_o) ? type_name(PyArray_TYPE((PyArrayObject *)x_o))
                                        : Py_TYPE(x_o)->tp_name);
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)x_o;
    if (PyArray_NDIM(x) < 1) {
        PyErr_SetString(PyExc_ValueError, PREFIX "quantize: argument 'x' must have at least 1 "
                                                 "dimension, got a 0-d array");
        return NULL;
    }
    const int nd = PyArray_NDIM(x);
    if (check_row("quantize", "x", PyArray_DIM(x, nd - 1), qtype)) return NULL;
    PyArrayObject *xf = (PyArrayObject *)PyArray_FromAny(
        x_o, PyArray_DescrFromType(NPY_FLOAT32), 0, 0, NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST,
        NULL);
    if (!xf) return NULL;
    const float *xv = PyArray_DATA(xf);
    const npy_intp count = PyArray_SIZE(xf);
    for (npy_intp i = 0; i < count; i++)
        if (!isfinite(xv[i])) {
            Py_DECREF(xf);
            PyErr_Format(PyExc_ValueError,
                         PREFIX "quantize: argument 'x' must be finite (as float32); element "
                                "%zd (flat index) is not",
                         (Py_ssize_t)i);
            return NULL;
        }
    npy_intp dims[NPY_MAXDIMS];
    memcpy(dims, PyArray_DIMS(xf), nd * sizeof(npy_intp));
    const size_t K = (size_t)dims[nd - 1];
    dims[nd - 1] = (npy_intp)lora_qrow_bytes(qtype, K);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_UINT8);
    if (out) {
        const size_t rows = (size_t)count / K;
        uint8_t *q = PyArray_DATA(out);
        Py_BEGIN_ALLOW_THREADS;
        lora_quantize(q, xv, rows, K, qtype);
        Py_END_ALLOW_THREADS;
    }
    Py_DECREF(xf);
    return (PyObject *)out;
}

LORA_DOC(dequantize,
"dequantize(data, qtype, shape)\n--\n\n"
"The float32 values of quantized blocks.\n\n"
"Bit for bit what ``gguf.quants.dequantize`` gives for Q8_0, Q4_0, Q4_1, Q4_K and Q6_K.\n\n"
"Parameters\n----------\n"
"data : ndarray of uint8, C-contiguous\n    The block bytes, rows as GGUF lays them out.\n"
"qtype : {'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K', 'NF4', 'NF4_DQ'}\n"
"shape : tuple of int\n    Of the values; the last dimension a multiple of the block.\n\n"
"Returns\n-------\nvalues : ndarray of float32, shape ``shape``");

PyObject *py_dequantize(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    static char *kwlist[] = {"data", "qtype", "shape", NULL};
    PyObject *d_o, *q_o, *s_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:dequantize", kwlist, &d_o, &q_o, &s_o))
        return NULL;
    int qtype, nd;
    npy_intp dims[NPY_MAXDIMS], count;
    if (arg_qtype("dequantize", q_o, 0, &qtype) ||
        arg_shape("dequantize", s_o, qtype, dims, &nd, &count))
        return NULL;
    PyArrayObject *data = arg_bytes("dequantize", d_o);
    if (!data) return NULL;
    PyArrayObject *out = NULL;
    if (!check_nbytes("dequantize", data, count, dims[nd - 1], qtype) &&
        (out = (PyArrayObject *)PyArray_SimpleNew(nd, dims, NPY_FLOAT32))) {
        const size_t K = (size_t)dims[nd - 1], rows = (size_t)count / K;
        float *y = PyArray_DATA(out);
        const uint8_t *q = PyArray_DATA(data);
        Py_BEGIN_ALLOW_THREADS;
        lora_dequantize(y, q, rows, K, qtype);
        Py_END_ALLOW_THREADS;
    }
    Py_DECREF(data);
    return (PyObject *)out;
}

/* ------------------------------------------------------------------ QuantWeight */

static PyObject *quantweight_new(PyTypeObject *cls, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "qtype", "shape", "activations", NULL};
    PyObject *d_o, *q_o, *s_o, *a_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$O:QuantWeight", kwlist, &d_o, &q_o, &s_o,
                                     &a_o))
        return NULL;
    int act8 = 0;
    if (a_o) {
        const char *a = PyUnicode_Check(a_o) ? PyUnicode_AsUTF8(a_o) : NULL;
        if (!a || (strcmp(a, "float") && strcmp(a, "q8"))) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         PREFIX "QuantWeight: argument 'activations' must be 'float' or 'q8', "
                                "got %R", a_o);
            return NULL;
        }
        act8 = !strcmp(a, "q8");
    }
    int qtype, nd;
    npy_intp dims[NPY_MAXDIMS], count;
    if (arg_qtype("QuantWeight", q_o, 0, &qtype) ||
        arg_shape("QuantWeight", s_o, qtype, dims, &nd, &count))
        return NULL;
    if (nd != 2) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "QuantWeight: argument 'shape' must be (d_out, d_in), got %R", s_o);
        return NULL;
    }
    if (dims[0] < 1 || dims[0] > INT32_MAX || dims[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "QuantWeight: argument 'shape' must be in [1, 2**31 - 1], got %R",
                     s_o);
        return NULL;
    }
    PyArrayObject *data = arg_bytes("QuantWeight", d_o);
    if (!data) return NULL;
    QuantWeight *self = NULL;
    if (!check_nbytes("QuantWeight", data, count, dims[1], qtype) &&
        (self = (QuantWeight *)cls->tp_alloc(cls, 0))) {
        self->data = data;
        self->qtype = qtype;
        self->act8 = act8;
        self->d_out = dims[0], self->d_in = dims[1];
        return (PyObject *)self;
    }
    Py_DECREF(data);
    return NULL;
}

static void quantweight_dealloc(QuantWeight *self) {
    Py_XDECREF(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *quantweight_shape(QuantWeight *self, void *closure) {
    (void)closure;
    return Py_BuildValue("(nn)", (Py_ssize_t)self->d_out, (Py_ssize_t)self->d_in);
}

static PyObject *quantweight_qtype(QuantWeight *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(lora_qtype_name(self->qtype));
}

static PyObject *quantweight_data(QuantWeight *self, void *closure) {
    (void)closure;
    return Py_NewRef((PyObject *)self->data);
}

static PyObject *quantweight_activations(QuantWeight *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(self->act8 ? "q8" : "float");
}

static PyObject *quantweight_nbytes(QuantWeight *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t((Py_ssize_t)PyArray_NBYTES(self->data));
}

static PyObject *quantweight_repr(QuantWeight *self) {
    return PyUnicode_FromFormat("QuantWeight(qtype='%s', shape=(%zd, %zd)%s)",
                                lora_qtype_name(self->qtype), (Py_ssize_t)self->d_out,
                                (Py_ssize_t)self->d_in, self->act8 ? ", activations='q8'" : "");
}

static PyGetSetDef quantweight_getset[] = {
    {"shape", (getter)quantweight_shape, NULL, "(d_out, d_in), the weight's shape", NULL},
    {"qtype", (getter)quantweight_qtype, NULL, "the block format, e.g. 'Q4_0'", NULL},
    {"data", (getter)quantweight_data, NULL, "the block bytes (the array given, not a copy)",
     NULL},
    {"nbytes", (getter)quantweight_nbytes, NULL, "bytes of the blocks", NULL},
    {"activations", (getter)quantweight_activations, NULL,
     "'float', or 'q8': decode-sized forwards take x in 8-bit blocks", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

PyDoc_STRVAR(quantweight_doc,
"QuantWeight(data, qtype, shape, *, activations='float')\n--\n\n"
"A frozen weight held quantized, for the products of linear_forward, linear_backward,\n"
"dense_forward and dense_backward (pass it as their ``weight``, with float32 or float64\n"
"inputs). Up to 4 rows of input the forward takes dot products straight from the blocks\n"
"(each row of W dequantized in L1 and used at once); from 5 rows, and in every backward,\n"
"W is dequantized 1 MB of rows at a time and multiplied by the BLAS GEMM. The weight is\n"
"never dequantized whole. It cannot be trained (no dweight).\n\n"
"activations='q8' (Q4_0, Q4_1 and Q8_0 on CPUs with AVX2, float32 inputs): those forwards of\n"
"up to 4 rows quantize each row of x in blocks of 32 to 8 bits (llama.cpp's Q8_1: scale\n"
"amax / 127, nearest rounding) and take the block products in integers, about a third of\n"
"the instructions: the result is W times x's 8-bit rounding, not W times x. Other types,\n"
"larger batches, float64 and every backward take the float path.\n\n"
"Parameters\n----------\n"
"data : ndarray of uint8, C-contiguous\n"
"    The block bytes, d_out rows of ``lora.quant.row_bytes(qtype, d_in)`` bytes (kept by\n"
"    reference, never copied).\n"
"qtype : {'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K', 'NF4', 'NF4_DQ'}\n"
"shape : (d_out, d_in)\n    d_in a multiple of the block.\n"
"activations : {'float', 'q8'}, keyword-only");

PyTypeObject QuantWeightType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "lora.functional.QuantWeight",
    .tp_basicsize = sizeof(QuantWeight),
    .tp_dealloc = (destructor)quantweight_dealloc,
    .tp_repr = (reprfunc)quantweight_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = quantweight_doc,
    .tp_getset = quantweight_getset,
    .tp_new = quantweight_new,
};
