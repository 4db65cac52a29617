"""HOBBIT-style mixed-precision expert offloading for MoE language models.

`store` packs experts to disk in several precisions (`quant`: HQQ-style int4/int2),
`cache` keeps a byte-budgeted subset in memory, `policy` decides what precision to load,
what to evict and what to prefetch, `loader` reads records in background threads and
`runtime` wires it all into a model by replacing each MoE block's `experts` module
(`blocks`: our `edgeopt.models.moe` and transformers' Mixtral / Qwen2-MoE / OLMoE).
`offload` is the Python API, `bench` the side-by-side benchmark, `cli` the `moe` commands.
"""
