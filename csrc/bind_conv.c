/* bind_conv.c: the bindings of im2col and col2im, the data movement of a 2-D convolution
 * (kernels: csrc/kernels/conv_impl.h). lora.nn.Conv2d and the LoRA conv layer run the
 * GEMMs on the rows im2col makes through the dense and LoRA bindings (bind_linear.c).
 *
 * The geometry arguments (kernel_size, stride, padding, dilation) are an int or a pair of
 * ints, as torch.nn.Conv2d's; both functions check them and the output size the same way.
 */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "kernels.h"

#define CONV_GEOMETRY_DOC                                                                    \
    "kernel_size : int or (int, int)\n    (kh, kw), at least 1.\n"                          \
    "stride : int or (int, int)\n    At least 1.\n"                                         \
    "padding : int or (int, int)\n    Zeros on each side, at least 0.\n"                    \
    "dilation : int or (int, int)\n    At least 1.\n"

/* An int or a pair of ints, each in [lo, 2**31): into out[0], out[1]. */
static int arg_pair(const Call *c, const char *name, PyObject *obj, long long lo, size_t *out) {
    long long v[2];
    if (PyTuple_Check(obj) || PyList_Check(obj)) {
        if (PySequence_Size(obj) != 2) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: argument '%s' must be an int or a pair of ints, got %R",
                         c->func, name, obj);
            return -1;
        }
        for (int i = 0; i < 2; i++) {
            PyObject *item = PySequence_GetItem(obj, i);
            if (!item) return -1;
            const int bad = arg_int(PREFIX, c->func, name, item, lo, INT_MAX, &v[i]);
            Py_DECREF(item);
            if (bad) return -1;
        }
    } else {
        if (arg_int(PREFIX, c->func, name, obj, lo, INT_MAX, &v[0])) return -1;
        v[1] = v[0];
    }
    out[0] = (size_t)v[0];
    out[1] = (size_t)v[1];
    return 0;
}

/* The geometry for images (n, ch, h, w) and the output size; ValueError when the dilated
 * kernel does not fit the padded image or cols would not fit a BLAS int. */
static int conv_dims(const Call *c, const npy_intp *shape, PyObject *k_o, PyObject *s_o,
                     PyObject *p_o, PyObject *d_o, LoraConvDims *d) {
    size_t k[2], s[2] = {1, 1}, p[2] = {0, 0}, dl[2] = {1, 1};
    if (arg_pair(c, "kernel_size", k_o, 1, k) || (s_o && arg_pair(c, "stride", s_o, 1, s)) ||
        (p_o && arg_pair(c, "padding", p_o, 0, p)) || (d_o && arg_pair(c, "dilation", d_o, 1, dl)))
        return -1;
    for (int i = 0; i < 4; i++)
        if (shape[i] < 1) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: the images (n, c, h, w) must have every dimension at least "
                                "1, got (%" NPY_INTP_FMT ", %" NPY_INTP_FMT ", %" NPY_INTP_FMT
                                ", %" NPY_INTP_FMT ")",
                         c->func, shape[0], shape[1], shape[2], shape[3]);
            return -1;
        }
    const size_t hw[2] = {(size_t)shape[2], (size_t)shape[3]};
    size_t o[2];
    for (int i = 0; i < 2; i++) {
        const unsigned long long span = (unsigned long long)dl[i] * (k[i] - 1) + 1;
        const unsigned long long padded = hw[i] + 2ULL * p[i];
        if (span > padded) {
            PyErr_Format(PyExc_ValueError,
                         PREFIX "%s: the dilated kernel (%llu %s) is larger than the padded "
                                "image (%llu); no output pixel",
                         c->func, span, i ? "columns" : "rows", padded);
            return -1;
        }
        o[i] = (size_t)((padded - span) / s[i] + 1);
    }
    *d = (LoraConvDims){(size_t)shape[0], (size_t)shape[1], hw[0], hw[1], k[0], k[1], s[0],
                        s[1], p[0], p[1], dl[0], dl[1], o[0], o[1]};
    const double rows = (double)d->n * (double)o[0] * o[1], cols = (double)d->c * k[0] * k[1];
    if (rows > INT_MAX || cols > INT_MAX || rows * cols > (double)NPY_MAX_INTP / 8) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "%s: the patches would be a (%.0f, %.0f) array, beyond what BLAS "
                            "takes (at most %d rows and columns)",
                     c->func, rows, cols, INT_MAX);
        return -1;
    }
    return 0;
}

LORA_DOC(im2col,
"im2col(x, kernel_size, *, stride=1, padding=0, dilation=1)\n--\n\n"
"The patches of a batch of images as rows: ``cols[(b, y, x)]`` is the patch of image b\n"
"under output pixel (y, x), flattened in the kernel's (channel, i, j) order, zero where it\n"
"lies in the padding; ``cols @ weight.reshape(out_channels, -1).T`` is the convolution\n"
"(torch.nn.functional.conv2d's, groups=1).\n\n"
"Parameters\n----------\n"
"x : ndarray, shape (n, c, h, w)\n"
CONV_GEOMETRY_DOC
"\nReturns\n-------\n"
"cols : ndarray, shape (n * oh * ow, c * kh * kw), with\n"
"    ``oh = (h + 2 padding - dilation (kh - 1) - 1) // stride + 1`` (likewise ow)");

PyObject *py_im2col(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "kernel_size", "stride", "padding", "dilation", NULL};
    PyObject *x_o, *k_o, *s_o = NULL, *p_o = NULL, *d_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$OOO:im2col", kwlist, &x_o, &k_o, &s_o,
                                     &p_o, &d_o))
        return NULL;
    Call c = CALL_INIT("im2col", "x");
    PyArrayObject *x = NULL, *cols = NULL;
    PyObject *result = NULL;
    LoraConvDims d;
    if (arg_array(&c, &x, "x", x_o) || check_ndim(&c, "x", x, 4, 0) ||
        conv_dims(&c, PyArray_DIMS(x), k_o, s_o, p_o, d_o, &d) || call_carrays(&c))
        goto done;
    const npy_intp shape[2] = {(npy_intp)(d.n * d.oh * d.ow), (npy_intp)(d.c * d.kh * d.kw)};
    if (call_new(&c, &cols, 2, shape)) goto done;
    CALL_KERNEL(&c, im2col, PyArray_DATA(cols), PyArray_DATA(x), &d);
    result = Py_NewRef(cols);
done:
    return call_end(&c, result);
}

LORA_DOC(col2im,
"col2im(cols, image_shape, kernel_size, *, stride=1, padding=0, dilation=1)\n--\n\n"
"The adjoint of im2col: the gradient of the images given the gradient of their patches,\n"
"each patch element added back onto the pixel it was read from (padding dropped).\n\n"
"Parameters\n----------\n"
"cols : ndarray, shape (n * oh * ow, c * kh * kw)\n"
"image_shape : (n, c, h, w)\n    The images' shape.\n"
CONV_GEOMETRY_DOC
"\nReturns\n-------\ndx : ndarray, shape image_shape (a new array)");

PyObject *py_col2im(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cols", "image_shape", "kernel_size", "stride", "padding",
                             "dilation", NULL};
    PyObject *c_o, *shape_o, *k_o, *s_o = NULL, *p_o = NULL, *d_o = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$OOO:col2im", kwlist, &c_o, &shape_o, &k_o,
                                     &s_o, &p_o, &d_o))
        return NULL;
    Call c = CALL_INIT("col2im", "cols");
    PyArrayObject *cols = NULL, *dx = NULL;
    PyObject *result = NULL;
    npy_intp shape[4];
    LoraConvDims d;
    if (!(PyTuple_Check(shape_o) || PyList_Check(shape_o)) || PySequence_Size(shape_o) != 4) {
        PyErr_Format(PyExc_ValueError,
                     PREFIX "col2im: argument 'image_shape' must be a tuple (n, c, h, w), got %R",
                     shape_o);
        goto done;
    }
    for (int i = 0; i < 4; i++) {
        long long v;
        PyObject *item = PySequence_GetItem(shape_o, i);
        if (!item) goto done;
        const int bad = arg_int(PREFIX, "col2im", "image_shape", item, 1, INT_MAX, &v);
        Py_DECREF(item);
        if (bad) goto done;
        shape[i] = (npy_intp)v;
    }
    if (arg_array(&c, &cols, "cols", c_o) || conv_dims(&c, shape, k_o, s_o, p_o, d_o, &d))
        goto done;
    const npy_intp want[2] = {(npy_intp)(d.n * d.oh * d.ow), (npy_intp)(d.c * d.kh * d.kw)};
    if (check_shape(&c, "cols", cols, 2, want, "(n * oh * ow, c * kh * kw)") ||
        call_carrays(&c) || call_new(&c, &dx, 4, shape))
        goto done;
    CALL_KERNEL(&c, col2im, PyArray_DATA(dx), PyArray_DATA(cols), &d);
    result = Py_NewRef(dx);
done:
    return call_end(&c, result);
}
