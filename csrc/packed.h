/* packed.h: the PackedWeight type and the `weight` argument of the linear and dense
 * bindings, which takes an array or a PackedWeight (packed.c). The packing and the GEMM that
 * reads the panels are kernels (csrc/kernels/panel_gemm.c), deliberately not here. */
#ifndef LORA_PACKED_H
#define LORA_PACKED_H

#include "args.h"
#include "kernels.h"

/* A frozen weight copied once into the panels of lora's packed GEMM: W^T's for forwards
 * and, when packed with backward=True, W's for input gradients. */
typedef struct {
    PyObject_HEAD
    PyArrayObject *fwd, *bwd; /* bwd NULL when packed without backward */
    npy_intp d_out, d_in;
    int type;
} PackedWeight;

extern PyTypeObject PackedWeightType;

/* A frozen weight held as quantized blocks (bind_quant.c): d_out rows of d_in elements. */
typedef struct {
    PyObject_HEAD
    PyArrayObject *data; /* uint8, C-contiguous, the blocks; a reference, never copied */
    int qtype;           /* LORA_Q8_0 ... (kernels.h) */
    int act8;            /* activations="q8": see LoraPacked */
    npy_intp d_out, d_in;
} QuantWeight;

extern PyTypeObject QuantWeightType;

/* The `weight` argument: an array (held by the Call, fan_in_fan_out = wt), a PackedWeight
 * or a QuantWeight (held by the Call, wt must be False), with d_out and d_in from any. `direction` names
 * the panels the call needs: 0 forward, 1 backward, -1 none. */
typedef struct {
    PyArrayObject *array;
    PackedWeight *packed;
    QuantWeight *quant;
    int direction;
    npy_intp d_out, d_in;
    LoraPacked pk;            /* the kernels' view of the panels, once weight_panels ran */
    const LoraPacked *kernel; /* &pk for a PackedWeight or QuantWeight, NULL for an array */
} WeightArg;

int arg_weight(Call *c, PyObject *obj, int wt, int direction, WeightArg *w);

/* After validation: the panels' (or the quantized products') scratch for n rows, from the
 * Call (nothing for an array). */
int weight_panels(Call *c, WeightArg *w, npy_intp n);

/* The weight's data for the kernels: the array's, or NULL for a PackedWeight / QuantWeight. */
static inline const void *weight_data(const WeightArg *w) {
    return w->array ? PyArray_DATA(w->array) : NULL;
}

#endif /* LORA_PACKED_H */
