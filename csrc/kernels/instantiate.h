/* kernels/instantiate.h: compiles a type-generic body twice, for float32 and float64.
 *
 * A kernel file defines LORA_IMPL as the name of its body ("lora_impl.h") and includes this
 * file; the body is then included once with
 *   T = float,  SUF = f32, GEMM/GEMV/GER = cblas_sgemm/sgemv/sger, SQRT = sqrtf, EXP = exp_f32,
 *               LORA_T_IS_F32 defined
 * and once with
 *   T = double, SUF = f64, GEMM/GEMV/GER = cblas_dgemm/dgemv/dger, SQRT = sqrt,  EXP = exp,
 * and FN(name) naming name_f32 / name_f64. Everything is undefined again afterwards
 * (LORA_IMPL included), so a file could instantiate a second body. This file has no include
 * guard on purpose, and holds no code of its own.
 */
#ifndef LORA_IMPL
#error "define LORA_IMPL (the body to instantiate) before including instantiate.h"
#endif

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

#define T float
#define SUF f32
#define LORA_T_IS_F32 1
#define GEMM CBLAS_FUNC(cblas_sgemm)
#define GEMV CBLAS_FUNC(cblas_sgemv)
#define GER CBLAS_FUNC(cblas_sger)
#define SQRT sqrtf
#define EXP exp_f32
#include LORA_IMPL
#undef T
#undef SUF
#undef LORA_T_IS_F32
#undef GEMM
#undef GEMV
#undef GER
#undef SQRT
#undef EXP

#define T double
#define SUF f64
#define GEMM CBLAS_FUNC(cblas_dgemm)
#define GEMV CBLAS_FUNC(cblas_dgemv)
#define GER CBLAS_FUNC(cblas_dger)
#define SQRT sqrt
#define EXP exp
#include LORA_IMPL
#undef T
#undef SUF
#undef GEMM
#undef GEMV
#undef GER
#undef SQRT
#undef EXP

#undef CAT_
#undef CAT
#undef FN
#undef LORA_IMPL
