"""Test and benchmark infrastructure of sglang-hip-decode (nothing on the serving path imports it).

``audit`` (copy audit), ``providers`` (which implementation of each ROCm kernel runs here),
``sglang_import`` (sglang's modules on any machine, ``swap_attrs``), ``shapes`` (model shapes),
``fake_backends`` and ``mla_decode`` (the MLA/NSA decode path of sglang 0.5.11 assembled from its
real pieces), ``nsa_indexer`` (the NSA indexer's q/k path), ``ab`` (patched-vs-unpatched runs for
the decode benchmarks), ``releases`` (whether a patch has edits on the release this process imports).
Shipped with the package so the benchmarks run on the GPU host too.
"""
