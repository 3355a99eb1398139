/* args.h: argument checking for the bindings, and the bookkeeping of one call (args.c).
 *
 * A binding declares a Call, fetches each argument with one helper per kind (an array of
 * the call's float dtype, an in-place array, a real, the dropout pair, ...), checks shapes,
 * allocates its outputs and scratch through the Call, runs its kernel with CALL_KERNEL and
 * ends in one place with call_end, which releases every reference and scratch buffer the
 * Call holds, on success and failure alike. Messages name the function and the argument:
 *   lora.functional.linear_forward: argument 'A' must have shape (r, d_in) = (8, 512), got (8, 511)
 * TypeError for a wrong type or dtype, ValueError for everything else.
 * This file deliberately knows no kernel and no PackedWeight (packed.h).
 */
#ifndef LORA_ARGS_H
#define LORA_ARGS_H

#include "py_common.h"

#include <stdint.h>

#define CALL_MAX_ARRAYS 12

typedef struct {
    const char *func;     /* the Python function (without PREFIX), named in every message */
    const char *type_ref; /* the argument whose dtype every array argument must share */
    int type;             /* that dtype, NPY_FLOAT32 or NPY_FLOAT64; -1 until the first array */
    int n;                /* arrays held */
    PyArrayObject **held[CALL_MAX_ARRAYS]; /* the binding's variables holding them */
    unsigned char input[CALL_MAX_ARRAYS];  /* read-only inputs, which call_carrays may copy */
    PyObject *obj;        /* one more reference released by call_end (a PackedWeight) */
    void *scratch[2];     /* scratch given back by call_end */
    PyArrayObject **list[2]; /* the arrays of list arguments (arg_array_list) */
    Py_ssize_t list_n[2];
} Call;

#define CALL_INIT(func, type_ref)                                                            \
    {(func), (type_ref), -1, 0, {NULL}, {0}, NULL, {NULL, NULL}, {NULL, NULL}, {0, 0}}

/* "float32" or "float64". */
const char *type_name(int type);

/* Each returns 0, or -1 with the Python error set. The array helpers store a new reference
 * in *slot and have the Call hold it (the binding never releases it itself). */

/* A read-only input of the call's dtype (the first array argument sets it). */
int arg_array(Call *c, PyArrayObject **slot, const char *name, PyObject *obj);
/* The same, or *slot = NULL for None. */
int arg_optional(Call *c, PyArrayObject **slot, const char *name, PyObject *obj);
/* An array updated in place: also writeable, aligned, native-order and C-contiguous; never
 * copied, since a copy would lose the update. */
int arg_inplace(Call *c, PyArrayObject **slot, const char *name, PyObject *obj);
/* A list or tuple of `ndim`-D arrays of the call's dtype (the messages name item k as
 * name[k]); *items is held by the Call, at most two lists a call. call_carrays makes each
 * C-contiguous, after the shape checks, like the other inputs: read the items' data after
 * it. */
int arg_array_list(Call *c, const char *name, PyObject *obj, int ndim, PyArrayObject ***items,
                   Py_ssize_t *len);
/* Has the Call hold *slot, a new reference (or NULL); `input`: call_carrays may copy it. */
int call_hold(Call *c, PyArrayObject **slot, int input);

enum { REAL_ANY = 0, REAL_NONNEG = 1, REAL_UNIT = 2 /* in [0, 1) */ };

/* A finite real number in the stated range into *out; obj NULL (not given) leaves *out. */
int arg_real(const Call *c, const char *name, PyObject *obj, int range, double *out);
/* An int in [lo, hi]: an int or an integer scalar (__index__), never a float; TypeError for
 * another type, ValueError naming the range for one outside it (too large for C included).
 * `prefix` + `func` is the function as the user calls it. */
int arg_int(const char *prefix, const char *func, const char *name, PyObject *obj,
            long long lo, long long hi, long long *out);
/* `dropout` (a real in [0, 1), NULL: 0) and `seed`, required (an int in [0, 2**64)) when
 * dropout > 0 and ignored otherwise. */
int arg_dropout(const Call *c, PyObject *drop_o, PyObject *seed_o, double *p, uint64_t *seed);

int check_ndim(const Call *c, const char *name, PyArrayObject *a, int ndim, int at_least);
/* a's shape against `want` (ndim entries); `what` names the dims, e.g. "(r, d_in)". */
int check_shape(const Call *c, const char *name, PyArrayObject *a, int ndim,
                const npy_intp *want, const char *what);
/* a has the shape of `like`. */
int check_same_shape(const Call *c, const char *name, PyArrayObject *a, PyArrayObject *like,
                     const char *what);
/* a has the leading dims of `like` and last dim `last`. */
int check_rows_like(const Call *c, const char *name, PyArrayObject *a, PyArrayObject *like,
                    npy_intp last, const char *what);
/* BLAS takes int sizes: refuse anything larger (or below lo) before it reaches a BLAS call. */
int check_blas_size(const Call *c, const char *arg, const char *what, npy_intp size,
                    npy_intp lo);
/* A LoRA pair against a weight of d_out x d_in: A (r, d_in), B (d_out, r), r >= 1 and a BLAS
 * int; sets *r. */
int check_lora_pair(const Call *c, PyArrayObject *A, PyArrayObject *B, npy_intp d_out,
                    npy_intp d_in, npy_intp *r);
/* x is (..., d_in); *n, its rows (the product of the leading dims), fits a BLAS int. */
int check_x(const Call *c, PyArrayObject *x, npy_intp d_in);
int count_rows(const Call *c, PyArrayObject *x, npy_intp *n);
/* a (written) and b share no memory. */
int check_no_overlap(const Call *c, const char *out, PyArrayObject *a, const char *in,
                     PyArrayObject *b);

/* The product of all dims but the last. */
npy_intp leading_rows(PyArrayObject *a);

/* After every check: replaces each read-only input (list items included) that is not
 * aligned, native-order and C-contiguous by such a copy (cheap next to the GEMMs; a huge broadcast view has been
 * refused by the size checks by then). */
int call_carrays(Call *c);

/* New outputs of the call's dtype, held by the Call: shape dims, zero-filled with
 * call_zeros, or the leading dims of `like` and last dim `last` with call_new_rows. */
int call_new(Call *c, PyArrayObject **slot, int nd, const npy_intp *dims);
int call_zeros(Call *c, PyArrayObject **slot, int nd, npy_intp *dims);
int call_new_rows(Call *c, PyArrayObject **slot, PyArrayObject *like, npy_intp last);

/* Scratch of `bytes`, or of `elems` elements of the call's dtype, given back by call_end;
 * NULL with MemoryError set. */
void *call_scratch_bytes(Call *c, size_t bytes);
void *call_scratch(Call *c, size_t elems);

/* An optional array's data (NULL for none), and an optional output as a result (None). */
#define DATA_OR_NULL(a) ((a) ? PyArray_DATA(a) : NULL)
#define OR_NONE(a) ((a) ? (PyObject *)(a) : Py_None)

/* Releases everything the Call holds and returns result (NULL after an error). */
PyObject *call_end(Call *c, PyObject *result);

/* Runs name##_f32 or name##_f64, as the call's dtype says, with the GIL released. Both take
 * the same arguments: data pointers convert to either type's, and a double argument passed
 * for a `T` parameter (scale) is rounded to float for float32. Nothing in the arguments may
 * touch the Python API. */
#define CALL_KERNEL(c, name, ...)                                                            \
    do {                                                                                     \
        const int is_f32_ = (c)->type == NPY_FLOAT32;                                       \
        Py_BEGIN_ALLOW_THREADS;                                                              \
        if (is_f32_)                                                                         \
            name##_f32(__VA_ARGS__);                                                         \
        else                                                                                 \
            name##_f64(__VA_ARGS__);                                                         \
        Py_END_ALLOW_THREADS;                                                                \
    } while (0)

#endif /* LORA_ARGS_H */
