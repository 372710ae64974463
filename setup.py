"""Build the Cython core of tilecrate.

Every `ext/tilecrate/*.pyx` becomes `tilecrate.<name>`; per-module needs (libjpeg, OpenMP) live in
EXTRA below. `TILECRATE_EXT=_bundle,_mask` limits a build to those modules (handy while editing one).
"""
import os
import sys
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
EXTRA = {
    # libjpeg-turbo through the classic libjpeg API (jpeglib.h ships in libjpeg62-turbo-dev)
    "_jpeg": {"libraries": ["jpeg"], "compile": OPENMP, "link": OPENMP},
    # SQLite's C API (sqlite3.h ships in libsqlite3-dev): MBTiles/GeoPackage rows into arrays
    "_sqlite": {"libraries": ["sqlite3"]},
}

only = {m for m in os.environ.get("TILECRATE_EXT", "").split(",") if m}
extensions = []
for pyx in sorted(glob(os.path.join("ext", "tilecrate", "*.pyx"))):
    name = os.path.splitext(os.path.basename(pyx))[0]
    if only and name not in only:
        continue
    extra = EXTRA.get(name, {})
    extensions.append(
        Extension(
            f"tilecrate.{name}",
            [pyx],
            include_dirs=[numpy.get_include()],
            depends=sorted(glob(os.path.join("ext", "tilecrate", "*.h"))),  # C included by a module
            libraries=extra.get("libraries", []),
            extra_compile_args=["-O3", "-Wno-unreachable-code"] + extra.get("compile", []),
            extra_link_args=extra.get("link", []),
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=False,
    ),
)
