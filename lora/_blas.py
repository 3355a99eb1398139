"""Make sure the OpenBLAS that lora._C links is loadable before lora._C is imported.

The extension records the library by soname, with an rpath to the scipy_openblas32 package
beside it in site-packages, which covers a normal install. Where that rpath does not lead
to it (editable and --user installs, a build tree), the first import fails; then the
library is loaded by absolute path (scipy_openblas32 does so with RTLD_GLOBAL) and the
import retried. A build against a system OpenBLAS never needs the package.
"""

try:
    from . import _C  # noqa: F401
except ImportError as first_error:
    try:
        import scipy_openblas32
    except ImportError:
        raise first_error from None
    scipy_openblas32.get_openblas_config()
    from . import _C  # noqa: F401
