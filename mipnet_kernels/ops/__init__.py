"""Public ops: one module per op (schema, reference, fake, autograd, backend routing)."""

from .decode import decode_heatmaps, decode_heatmaps_reference, flip_merge, flip_merge_reference

__all__ = ["decode_heatmaps", "decode_heatmaps_reference", "flip_merge", "flip_merge_reference"]
