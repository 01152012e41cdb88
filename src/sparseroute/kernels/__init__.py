"""Kernels under the routing families: which library runs each matrix product
(:mod:`sparseroute.kernels.gemm`), and the compiled CPU kernels (``csrc/``), built and loaded by
:mod:`sparseroute.kernels.extension`."""
