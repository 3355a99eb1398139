"""Load the OpenBLAS that lora._C links before lora._C itself is imported.

The extension records the library by its soname with an rpath to the scipy_openblas32
package beside it in site-packages. Loading it here by absolute path (scipy_openblas32 does
so with RTLD_GLOBAL) makes the import work wherever that package lives: editable installs,
--user installs, a build tree. A build against a system OpenBLAS does not need this and
does not fail without the package.
"""

try:
    import scipy_openblas32

    scipy_openblas32.get_openblas_config()
except ImportError:  # LORA_BLAS=system build
    pass
