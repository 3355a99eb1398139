/* bind_blas.c: set_num_threads and blas_info, the two functions about the linked OpenBLAS
 * (reached through blas.h, as every other file reaches it). The thread count set here is
 * also the one lora's own thread pool uses (csrc/kernels/threads.c). */
#include "py_common.h"

#include "args.h"
#include "bindings.h"
#include "blas.h"

LORA_DOC(set_num_threads,
"set_num_threads(n)\n--\n\nSet the number of threads of the OpenBLAS that lora links.");

PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long long n;
    if (arg_int("lora.", "set_num_threads", "n", arg, 1, 4096, &n)) return NULL;
    CBLAS_FUNC(openblas_set_num_threads)((int)n);
    Py_RETURN_NONE;
}

LORA_DOC(blas_info,
"blas_info()\n--\n\nThe linked OpenBLAS: a dict with 'corename' (the kernel it runs),\n"
"'config' and 'num_threads'.");

PyObject *py_blas_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:s,s:i}", "corename", CBLAS_FUNC(openblas_get_corename)(),
                         "config", CBLAS_FUNC(openblas_get_config)(), "num_threads",
                         CBLAS_FUNC(openblas_get_num_threads)());
}
