"""Triton kernels of harmonizer_fast, installed as ``harmonizer_fast.kernels``.

One module per op family (``haar``, ...), each holding its kernels and their launchers. Import them only
through ``harmonizer_fast.ops``, which validates inputs and picks a backend; importing this package
imports triton.
"""
