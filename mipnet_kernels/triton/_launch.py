"""Launch parameters shared by the Triton kernels (one place, as Liger's calculate_settings)."""


def num_warps(tile_elems: int) -> int:
    """Warps for a program that streams ``tile_elems`` elements per step."""
    if tile_elems >= 2048:
        return 8
    if tile_elems >= 1024:
        return 4
    if tile_elems >= 256:
        return 2
    return 1
