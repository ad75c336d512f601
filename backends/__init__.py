"""Lowerings from the annotated IR to runtimes, one package each (`qcompiler.backend` is their contract).

Importing this package registers every backend; TVM itself is imported only when the
TVM backend builds or runs a library.
"""

from qcompiler.backends.simulate import backend as simulate_backend  # noqa: F401  (first: the default)
from qcompiler.backends.ort import backend as ort_backend  # noqa: F401
from qcompiler.backends.tvm import backend as tvm_backend  # noqa: F401
from qcompiler.backends.compressed_tensors import backend as compressed_tensors_backend  # noqa: F401
