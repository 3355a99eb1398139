/* bind_optim.c: the binding of adam_step, one Adam or AdamW step in place on a parameter and
 * its two moments (kernel: adam_step in csrc/kernels/elementwise.c).
 *
 * param, m and v are updated in place and so are rejected, never copied, unless writeable,
 * aligned, native-order, C-contiguous and separate arrays; grad is read only. The optimizer
 * over parameter groups is Python (lora/optim.py); this file holds only the step.
 */
#include "py_common.h"

#include <limits.h>

#include "args.h"
#include "bindings.h"
#include "kernels.h"

LORA_DOC(adam_step,
"adam_step(param, grad, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,\n"
"          weight_decay=0.0, decoupled=True)\n--\n\n"
"One Adam (decoupled=False) or AdamW (decoupled=True) step, in place on param, m and v,\n"
"exactly the update of torch.optim.Adam / torch.optim.AdamW.\n\n"
"Parameters\n----------\n"
"param, m, v : ndarray, one shape and dtype\n"
"    Updated in place: must be writeable, aligned, C-contiguous and separate arrays.\n"
"grad : ndarray, the shape and dtype of param\n    Read only (Adam's L2 term is not written into it).\n"
"step : int >= 1\n    The step number after this update (1 on the first call).\n"
"lr, eps, weight_decay : float >= 0\n"
"beta1, beta2 : float in [0, 1)\n"
"decoupled : bool\n    True for AdamW's decoupled weight decay, False for Adam's L2 term.\n\n"
"Returns\n-------\nNone");

PyObject *py_adam_step(PyObject *self, PyObject *args, PyObject *kwds) {
    static const char *func = "adam_step";
    static char *kwlist[] = {"param", "grad",  "m",   "v",            "step",      "lr",
                             "beta1", "beta2", "eps", "weight_decay", "decoupled", NULL};
    PyObject *p_o, *g_o, *m_o, *v_o, *step_o = NULL, *lr_o = NULL;
    PyObject *b1_o = NULL, *b2_o = NULL, *eps_o = NULL, *wd_o = NULL;
    int decoupled = 1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$OOOOOOp:adam_step", kwlist, &p_o, &g_o,
                                     &m_o, &v_o, &step_o, &lr_o, &b1_o, &b2_o, &eps_o, &wd_o,
                                     &decoupled))
        return NULL;
    if (!step_o || !lr_o) {
        PyErr_Format(PyExc_TypeError, PREFIX "%s: keyword arguments 'step' and 'lr' are required",
                     func);
        return NULL;
    }
    Call c = CALL_INIT(func, "param");
    PyArrayObject *param = NULL, *grad = NULL, *m = NULL, *v = NULL;
    PyObject *result = NULL;
    double lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0;
    long long step;
    const char *what = "param.shape";
    if (arg_inplace(&c, &param, "param", p_o) || arg_array(&c, &grad, "grad", g_o) ||
        arg_inplace(&c, &m, "m", m_o) || arg_inplace(&c, &v, "v", v_o) ||
        check_same_shape(&c, "grad", grad, param, what) ||
        check_same_shape(&c, "m", m, param, what) || check_same_shape(&c, "v", v, param, what) ||
        check_no_overlap(&c, "param", param, "m", m) ||
        check_no_overlap(&c, "param", param, "v", v) || check_no_overlap(&c, "m", m, "v", v) ||
        check_no_overlap(&c, "param", param, "grad", grad) ||
        check_no_overlap(&c, "m", m, "grad", grad) || check_no_overlap(&c, "v", v, "grad", grad))
        goto done;
    if (arg_int(PREFIX, func, "step", step_o, 1, LLONG_MAX, &step)) goto done;
    if (arg_real(&c, "lr", lr_o, REAL_NONNEG, &lr) ||
        arg_real(&c, "beta1", b1_o, REAL_UNIT, &beta1) ||
        arg_real(&c, "beta2", b2_o, REAL_UNIT, &beta2) ||
        arg_real(&c, "eps", eps_o, REAL_NONNEG, &eps) ||
        arg_real(&c, "weight_decay", wd_o, REAL_NONNEG, &wd) || call_carrays(&c))
        goto done;

    CALL_KERNEL(&c, adam_step, PyArray_DATA(param), PyArray_DATA(m), PyArray_DATA(v),
                PyArray_DATA(grad), (size_t)PyArray_SIZE(param), step, lr, beta1, beta2, eps,
                wd, decoupled);
    result = Py_NewRef(Py_None);
done:
    return call_end(&c, result);
}
