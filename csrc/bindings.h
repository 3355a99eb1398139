/* bindings.h: the functions of lora._C, as module.c's method table lists them.
 *
 * Each is defined in the bind_*.c file of its family, with its numpydoc docstring NAME_doc
 * written next to it by LORA_DOC. This header deliberately declares nothing else.
 */
#ifndef LORA_BINDINGS_H
#define LORA_BINDINGS_H

#include "py_common.h"

/* The docstring of binding `name`, visible to module.c. */
#define LORA_DOC(name, text) const char name##_doc[] = PyDoc_STR(text)

/* A function taking keyword arguments: py_NAME and its docstring NAME_doc. */
#define LORA_KW_BINDING(name)                                                                \
    PyObject *py_##name(PyObject *self, PyObject *args, PyObject *kwds);                     \
    extern const char name##_doc[]

/* bind_linear.c */
LORA_KW_BINDING(linear_forward);
LORA_KW_BINDING(linear_backward);
LORA_KW_BINDING(dense_forward);
LORA_KW_BINDING(dense_backward);
/* bind_multi.c */
LORA_KW_BINDING(mixed_forward);
/* bind_merge.c */
LORA_KW_BINDING(merge);
LORA_KW_BINDING(unmerge);

/* bind_dora.c */
LORA_KW_BINDING(dora_norm);
/* bind_conv.c */
LORA_KW_BINDING(im2col);
LORA_KW_BINDING(col2im);
/* bind_optim.c */
LORA_KW_BINDING(adam_step);
/* bind_nn.c */
LORA_KW_BINDING(gelu_forward);
LORA_KW_BINDING(gelu_backward);
LORA_KW_BINDING(layer_norm_forward);
LORA_KW_BINDING(layer_norm_backward);
LORA_KW_BINDING(attention_forward);
LORA_KW_BINDING(attention_backward);
/* bind_llama.c */
LORA_KW_BINDING(rms_norm_forward);
LORA_KW_BINDING(rms_norm_backward);
LORA_KW_BINDING(rope_forward);
LORA_KW_BINDING(rope_backward);
LORA_KW_BINDING(swiglu_forward);
LORA_KW_BINDING(swiglu_backward);
LORA_KW_BINDING(causal_attention_forward);
LORA_KW_BINDING(causal_attention_backward);
LORA_KW_BINDING(linear_cross_entropy);
/* bind_quant.c */
LORA_KW_BINDING(quantize);
LORA_KW_BINDING(dequantize);
/* bind_blas.c */
PyObject *py_set_num_threads(PyObject *self, PyObject *arg);
PyObject *py_blas_info(PyObject *self, PyObject *unused);
extern const char set_num_threads_doc[], blas_info_doc[];

#undef LORA_KW_BINDING

#endif /* LORA_BINDINGS_H */
