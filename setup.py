"""Build script: the Python package plus the C++ extension `moefuse._C` from csrc/.

The extension is optional: if it cannot be built, moefuse installs anyway and falls back to the
reference paths (with a warning at first use). CUDA sources are compiled only when
MOEFUSE_BUILD_CUDA=1, so a GPU-less host can still build them when asked.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["moefuse", "moefuse.*"]) + ["moefuse.kernels"]
PACKAGE_DIR = {"moefuse": "moefuse", "moefuse.kernels": "kernels"}


def extension_build():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed at build time: skipping the moefuse._C extension")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a broken toolchain must not block the install
                warnings.warn(f"moefuse._C was not built ({error}); using reference fallbacks")

    sources = sorted(glob.glob("csrc/*.cpp"))
    # -fno-trapping-math lets GCC if-convert the select loops; IEEE results are unchanged.
    args = {"cxx": ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-Wno-psabi"]}
    if os.environ.get("MOEFUSE_BUILD_CUDA") == "1":
        sources += sorted(glob.glob("csrc/*.cu"))
        args["nvcc"] = ["-O3", "-std=c++17"]
        extension = CUDAExtension("moefuse._C", sources, extra_compile_args=args,
                                  extra_link_args=["-fopenmp"], define_macros=[("MOEFUSE_CUDA", "1")])
    else:
        extension = CppExtension("moefuse._C", sources, extra_compile_args=args, extra_link_args=["-fopenmp"])
    return [extension], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
