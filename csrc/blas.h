/* blas.h: the one place that knows which OpenBLAS build is linked.
 *
 * The default build links the OpenBLAS of the PyPI package scipy-openblas32, whose symbols
 * carry a `scipy_` prefix (scipy_cblas_sgemm, scipy_openblas_get_corename, ...). A build
 * against a system OpenBLAS (LORA_SYSTEM_BLAS, set by setup.py from pkg-config) uses the
 * plain names. Every other file calls CBLAS_FUNC(cblas_sgemm) and never sees the prefix,
 * the way NumPy's npy_cblas.h does it.
 *
 * Both builds use 32-bit BLAS integers: every size handed to BLAS is checked against
 * INT_MAX by the caller first.
 */
#ifndef LORA_BLAS_H
#define LORA_BLAS_H

#include <cblas.h>

#ifdef LORA_SYSTEM_BLAS
#define CBLAS_FUNC(name) name
#else
#define CBLAS_FUNC(name) scipy_##name
#endif

/* OpenBLAS extensions (not in the CBLAS standard), declared here for the system build whose
 * cblas.h may come from another vendor. */
void CBLAS_FUNC(openblas_set_num_threads)(int num_threads);
int CBLAS_FUNC(openblas_get_num_threads)(void);
char *CBLAS_FUNC(openblas_get_corename)(void);
char *CBLAS_FUNC(openblas_get_config)(void);
#ifndef LORA_SYSTEM_BLAS
/* Caller-managed threading (OpenBLAS >= 0.3.27, declared with its types in the package's
 * cblas.h): OpenBLAS hands its parallel jobs to this callback instead of its own threads.
 * A build against a system OpenBLAS, which may be older, leaves OpenBLAS its own threads. */
void CBLAS_FUNC(openblas_set_threads_callback_function)(openblas_threads_callback callback);
#endif

#endif /* LORA_BLAS_H */
