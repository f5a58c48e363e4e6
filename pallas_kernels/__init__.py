"""Pallas kernels for NVFP4 and Hadamard-Lloyd (HLWQ) matmuls, each beside a pure-jnp reference with the same
signature: ``nvfp4.nvfp4_matmul`` (W4A16: codes and E4M3 scales decoded in the kernel, fp32 accumulation),
``hlwq.hlwq_matmul`` (rotated activations x Lloyd-Max lookup x block norm), ``hlwq.fwht`` (per-128 Walsh-
Hadamard). ``dispatch`` connects them to the quantized weight nodes (``nemojax.quant.set_backend``);
``lowering.lower_for_h100`` checks GPU lowerability on a CPU host. GPU backend: Pallas Triton, chosen explicitly.
Not yet here: grouped (ragged per-expert) kernels and jax-triton ``triton_call`` GEMVs.
"""
