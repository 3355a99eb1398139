"""Load the OpenBLAS that lora._C links, then lora._C.

Finding it: the extension records the library by soname, with an rpath to the
scipy_openblas32 package beside it in site-packages, which covers a normal install. Where
that rpath does not lead to it (editable and --user installs, a build tree), the first
import fails; then the library is loaded by absolute path (scipy_openblas32 does so with
RTLD_GLOBAL) and the import retried. A build against a system OpenBLAS never needs the
package.

Its idle threads: lora._C has OpenBLAS run its parallel jobs on lora's own thread pool (see
csrc/kernels/threads.c), so OpenBLAS's workers sit idle; what follows matters for a build against a
system OpenBLAS, which keeps them. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when it
loads; after each multithreaded call its workers spin for 2**N cycles before sleeping. The
default, N = 28 (~70 ms), keeps the second core busy spinning long after every GEMM, so
lora's own threaded passes (GELU, the attention softmax, merge, Adam) found it taken and ran
at one core's speed. lora's OpenBLAS loads with N = 18 (~65 us at 4 GHz), which still spans
the gaps in a loop of small GEMMs. The variable is set only for that load and only when the
user has not set it; it does not reach NumPy's or any other OpenBLAS in the process.
"""

import os

_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT"
_ours = _TIMEOUT not in os.environ
if _ours:
    os.environ[_TIMEOUT] = "18"
try:
    try:
        from . import _C  # noqa: F401
    except ImportError as first_error:
        try:
            import scipy_openblas32
        except ImportError:
            raise first_error from None
        scipy_openblas32.get_openblas_config()
        from . import _C  # noqa: F401
finally:
    if _ours:
        os.environ.pop(_TIMEOUT, None)
