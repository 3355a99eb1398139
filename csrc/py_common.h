/* py_common.h: the first include of every binding file (each .c file directly in csrc/ but
 * test_kernels.c).
 *
 * One extension, several C files using the NumPy C API: every file must see the same
 * PY_ARRAY_UNIQUE_SYMBOL, and all but module.c (which defines LORA_IMPORT_ARRAY and calls
 * import_array) must define NO_IMPORT_ARRAY, or each file would get a table of its own that
 * nothing fills. This header does both, after Python.h, so no file repeats it.
 * It deliberately holds no declarations of lora's own: see args.h, scratch.h, packed.h,
 * bindings.h.
 */
#ifndef LORA_PY_COMMON_H
#define LORA_PY_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL lora_ARRAY_API
#ifndef LORA_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

/* Every error message starts with the function's public name. */
#define PREFIX "lora.functional."

#endif /* LORA_PY_COMMON_H */
