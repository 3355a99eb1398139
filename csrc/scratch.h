/* scratch.h: the kernels' scratch memory, kept between calls (scratch.c). Bindings reach it
 * through args.h's call_scratch, which gives it back when the call ends; nothing else here. */
#ifndef LORA_SCRATCH_H
#define LORA_SCRATCH_H

#include <stddef.h>

/* `bytes` of scratch, 64-byte aligned, or NULL with MemoryError set (call with the GIL).
 * Give it back with give_scratch. */
void *take_bytes(size_t bytes);

/* `elems` elements of the NumPy float type `type` (NPY_FLOAT32 or NPY_FLOAT64). */
void *take_scratch(size_t elems, int type);

/* Gives back what take_scratch or take_bytes returned (NULL: nothing). */
void give_scratch(void *p);

#endif /* LORA_SCRATCH_H */
