"""`python -m mindxcomposer.ops [--force]`: builds the CPU kernels for this CPU ahead of the first model call and
says which instruction set and bf16 product path they use. (A `__main__` of the package, not of `cpu_kernels`:
the package imports `cpu_kernels` first, and running an imported module again as a script would load it twice.)"""
import sys

from .cpu_kernels import main

sys.exit(main())
