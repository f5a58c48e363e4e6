"""How routed experts run beyond the resident strategies of ``nemojax.blocks.moe``: host offload with a device
cache of slots per MoE layer (:mod:`.offload`) and its eviction policies (:mod:`.policies`)."""
