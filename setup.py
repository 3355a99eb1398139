"""Build of the C extension lora._C (the rest of the package is pure Python, see pyproject.toml).

BLAS: by default the OpenBLAS of the PyPI package scipy-openblas32 (a pinned runtime
dependency, so pip resolves it for every install), linked with an $ORIGIN-relative rpath to
where that package lives beside lora in site-packages; lora/_blas.py also loads it by
absolute path before importing lora._C, so editable and --user installs work too.
Why a dependency and not a copy inside the wheel: one OpenBLAS per process for lora,
no 30 MB duplicated in every wheel, and the same library NumPy-free users get from PyPI.

Opt-in: LORA_BLAS=system links a system OpenBLAS found by pkg-config (plain symbol names).
LORA_SANITIZE=1 builds with -fsanitize=address,undefined for CI's sanitizer run.
"""

import glob
import os
import shlex
import subprocess

import numpy
from setuptools import Extension, setup

# Every .c file of csrc/ (the binding) and csrc/kernels/ (the kernels), so a new file needs no
# edit here; csrc/test_kernels.c is the C-only test program, not part of the extension.
sources = sorted(f for f in glob.glob("csrc/*.c") + glob.glob("csrc/kernels/*.c")
                 if os.path.basename(f) != "test_kernels.c")
depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/kernels/*.h"))
# -fno-math-errno lets sqrt vectorise (Adam is then bandwidth-bound); -ffp-contract=off keeps
# a*b+c as two roundings, as PyTorch's CPU kernels round, so Adam trajectories match
# torch.optim to 1e-6 over many steps. BLAS is unaffected. -fopenmp-simd honours `omp simd`
# reductions (LayerNorm's row sums vectorise) and needs no OpenMP runtime.
compile_args = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd",
                "-fvisibility=hidden", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter",
                "-Wno-missing-field-initializers", "-Wno-psabi"]
link_args = ["-pthread"]
define_macros = []
include_dirs = ["csrc", numpy.get_include()]
library_dirs = []
libraries = []
runtime_library_dirs = []

if os.environ.get("LORA_BLAS", "scipy-openblas32") == "system":
    def pkg_config(flag):
        return shlex.split(subprocess.check_output(["pkg-config", flag, "openblas"], text=True))

    define_macros.append(("LORA_SYSTEM_BLAS", "1"))
    compile_args += pkg_config("--cflags")
    link_args += pkg_config("--libs")
else:
    import scipy_openblas32

    include_dirs.append(scipy_openblas32.get_include_dir())
    library_dirs.append(scipy_openblas32.get_lib_dir())
    libraries.append(scipy_openblas32.get_library())
    # lora/_C.so -> site-packages/scipy_openblas32/lib
    link_args.append("-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib")

if os.environ.get("LORA_SANITIZE"):
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args = [a for a in compile_args if a != "-O3"] + ["-O1"] + flags
    link_args += flags
    define_macros.append(("LORA_NO_CLONES", "1"))
    define_macros.append(("LORA_NO_SCRATCH_CACHE", "1"))  # ASan sees each scratch's bounds

setup(
    ext_modules=[
        Extension(
            "lora._C",
            sources=sources,
            depends=depends,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            define_macros=define_macros,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]
)
