"""Kernels for NVFP4 and Hadamard-Lloyd (HLWQ) matmuls, each beside a pure-jnp ``*_reference`` with the same
signature, all reading the checkpoint bytes as stored:

- ``nvfp4.nvfp4_matmul`` / ``nvfp4.nvfp4_grouped_matmul``: W4A16 (E2M1 codes and E4M3 scales decoded in the
  kernel, fp32 accumulation), dense (decode-GEMV or tensor-core path) and grouped (ragged, per expert);
- ``hlwq.hlwq_matmul`` / ``hlwq.hlwq_grouped_matmul``: rotated activations x Lloyd-Max lookup x block norm;
- ``hlwq.fwht``: the per-128-block Walsh-Hadamard transform;
- ``triton_gemv``: jax-triton (``triton_call``) decode GEMVs for NVFP4 and HLWQ (GPU only; imported lazily).

``common`` holds the shared driver and the grouped visit plan, ``dispatch`` connects the kernels to the quantized
weight nodes and the MoE (``nemojax.quant.set_backend``), ``lowering.lower_for_h100`` checks GPU lowerability on a
CPU host. GPU backend of the Pallas kernels: Triton, chosen explicitly.
"""
