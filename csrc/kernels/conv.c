/* kernels/conv.c: the 2-D convolution's data movement, for float32 and float64: im2col (an
 * image batch to the rows of patches a GEMM multiplies with the flattened kernel) and its
 * adjoint col2im (the gradient of the patches back onto the images).
 *
 * A convolution is then a dense layer on those rows (lora.nn.Conv2d): the forward is
 * im2col + dense_forward, the LoRA update of a conv (PEFT's lora_A a conv with the base's
 * kernel, lora_B a 1x1 conv) is linear_forward's on the same rows, and the backward ends in
 * col2im. Both passes are memory-bound copies, split over threads by lora_parallel_for:
 * im2col by output rows (each writes its own rows of cols), col2im by (image, channel)
 * planes (each adds into its own plane, so no two threads write one element). No BLAS here.
 */
#include "internal.h"

#define LORA_IMPL "conv_impl.h"
#include "instantiate.h"
