"""Block mixers, one module per block type: Mamba2 (``M``), MoE (``E``), attention (``*``), MLP (``-``)."""
