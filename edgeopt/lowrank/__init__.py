"""Low-rank factorization: factor math, factorized modules (Linear, 1x1 conv, Low-Rank SS2D),
the plan of what to factorize at which rank, and the distillation losses that recover accuracy.

Everything a factorized model needs at load time lives here, so `ModelArtifact` edits can
rebuild its structure without the passes that made it.
"""
