/* module.c: the module lora._C: its method table and its initialisation, nothing else.
 *
 * The functions live by family in bind_linear.c (linear and dense layers), bind_multi.c
 * (mixed_forward: a batch whose rows use different adapters), bind_merge.c (merge,
 * unmerge), bind_dora.c (dora_norm: DoRA's weight norm), bind_conv.c (im2col,
 * col2im: a 2-D convolution's patches), bind_optim.c (adam_step),
 * bind_nn.c (GELU, LayerNorm, attention), bind_llama.c
 * (RMSNorm, RoPE, SwiGLU, causal GQA attention), bind_quant.c (quantize, dequantize, the
 * QuantWeight type) and bind_blas.c (set_num_threads, blas_info); the PackedWeight type in
 * packed.c. Argument
 * checking is args.c's, the kernels' scratch scratch.c's. This is the one file that imports
 * the NumPy C API (LORA_IMPORT_ARRAY; see py_common.h).
 */
#define LORA_IMPORT_ARRAY
#include "py_common.h"

#include "bindings.h"
#include "kernels.h"
#include "packed.h"

/* A function taking keyword arguments, py_NAME, with its docstring NAME_doc. */
#define KW_METHOD(name)                                                                      \
    {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, name##_doc}

static PyMethodDef methods[] = {
    KW_METHOD(linear_forward),
    KW_METHOD(linear_backward),
    KW_METHOD(merge),
    KW_METHOD(unmerge),
    KW_METHOD(dora_norm),
    KW_METHOD(im2col),
    KW_METHOD(col2im),
    KW_METHOD(dense_forward),
    KW_METHOD(dense_backward),
    KW_METHOD(mixed_forward),
    KW_METHOD(adam_step),
    KW_METHOD(layer_norm_forward),
    KW_METHOD(layer_norm_backward),
    KW_METHOD(gelu_forward),
    KW_METHOD(gelu_backward),
    KW_METHOD(attention_forward),
    KW_METHOD(attention_backward),
    KW_METHOD(rms_norm_forward),
    KW_METHOD(rms_norm_backward),
    KW_METHOD(rope_forward),
    KW_METHOD(rope_backward),
    KW_METHOD(swiglu_forward),
    KW_METHOD(swiglu_backward),
    KW_METHOD(causal_attention_forward),
    KW_METHOD(causal_attention_backward),
    KW_METHOD(linear_cross_entropy),
    KW_METHOD(quantize),
    KW_METHOD(dequantize),
    {"set_num_threads", py_set_num_threads, METH_O, set_num_threads_doc},
    {"blas_info", py_blas_info, METH_NOARGS, blas_info_doc},
    {NULL, NULL, 0, NULL}};

#undef KW_METHOD

static int exec_module(PyObject *module) {
    import_array1(-1);
    lora_use_pool_for_blas();
    if (PyType_Ready(&PackedWeightType) < 0 ||
        PyModule_AddObjectRef(module, "PackedWeight", (PyObject *)&PackedWeightType) < 0 ||
        PyType_Ready(&QuantWeightType) < 0 ||
        PyModule_AddObjectRef(module, "QuantWeight", (PyObject *)&QuantWeightType) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_C", "lora's C kernels (see csrc/); use lora.functional.", 0,
    methods, slots, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&moduledef); }
