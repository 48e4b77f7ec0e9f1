"""Attention-authoring DSL: key sets, score/mask modifiers and sinks compiled into one TileLang kernel.

Not built yet; the CSA/HCA attention kernels will be written through it.
"""

__all__: list[str] = []
