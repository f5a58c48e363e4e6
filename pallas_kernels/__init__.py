"""Kernels for NVFP4 and Hadamard-Lloyd (HLWQ) matmuls, each beside a pure-jnp ``*_reference`` with the same
signature, all reading the checkpoint bytes as stored (raw arrays and static ints in, no weight objects):

- ``nvfp4.nvfp4_matmul`` / ``nvfp4.nvfp4_grouped_matmul``: W4A16 (E2M1 codes and E4M3 scales decoded in the
  kernel, fp32 accumulation), dense (decode-GEMV or tensor-core path) and grouped (ragged, per expert);
- ``hlwq.hlwq_matmul`` / ``hlwq.hlwq_grouped_matmul``: rotated activations x Lloyd-Max lookup x block norm;
- ``hlwq.fwht``: the per-128-block Walsh-Hadamard transform;
- ``triton_gemv``: jax-triton (``triton_call``) decode GEMVs for NVFP4 and HLWQ (GPU only; imported lazily).

A leaf package: it imports jax, Pallas, NumPy, triton / jax-triton and itself only (the small decoders the
references need -- E2M1, LSB-first unpacking, the Hadamard matrix, the scaled level table -- are written here).
``common`` holds the shared driver and the grouped visit plan, ``lowering.lower_for_h100`` checks GPU lowerability
on a CPU host. The library connects the quantized weight nodes and the MoE to these kernels in ``nemojax.kernels``
(``nemojax.quant.set_backend``). GPU backend of the Pallas kernels: Triton, chosen explicitly.
"""
