"""The CUDA kernels' index and tiling math, proved on the CPU (no GPU, no nvcc needed).

The kernels in ``csrc/cuda/`` take their index math from host-and-device headers --
``mimb_tiling.h`` (MIMB ``plan_tiling`` / ``tile_of`` / ``thread_map`` and who writes which
per-channel partial sum), ``nms_layout.h`` (the OKS-NMS bitmask layout, the mask kernel's
tiling and staging, the greedy kernel's shared-memory plan) and ``decode_layout.h`` (decode's
block -> map mapping and block sizes, the thread splits of a map, flip_merge's index digits).
``tests/cuda_index_math_driver.cpp`` compiles those very headers with the host C++ compiler
and simulates the kernels thread by thread over a grid of shapes (C = 1..2048, odd and
round sizes, H*W from 1 to 256x192, NCHW and NHWC, the float32 and float16/bfloat16 vector
widths, aligned and unaligned): every element read exactly once, every partial and
bitmask word written exactly once, every index within the tensor, the workspace and shared
memory.  A failure prints the first violated checks, e.g.::

    FAIL mimb C=384 HW=1 NHWC V=4 (kVec 4): partial of channel 256 in tile (b=0, ct=0,
    sp=0) written 0 times, expected 1

The driver is built once per test session (g++ from ``$CXX`` or ``PATH``, ``-O2``, about a
second); without a C++ compiler the tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ROOT / "csrc" / "cuda"
DRIVER = Path(__file__).resolve().parent / "cuda_index_math_driver.cpp"

# Channel counts: every C up to 2048 on small maps; on larger maps the sizes around the
# block width (255/256/257), the tile widths of the vectorised channels-last path (264 ..
# 2048: up to 256 lanes x 8 channels) and odd ones.
ODD_C = ("1,2,3,4,5,7,8,15,16,17,31,32,33,48,63,64,65,96,127,128,129,192,255,256,257,264,"
         "320,384,511,512,513,1000,1024,1536,2047,2048")
SMALL_HW = "1,2,3,4,5,7,8,9,12,16,17,35,48,108,192,561"
# 64x48, 96x72, 256x192: several pixel splits per sample.
LARGE_HW = "3072,6912,49152"


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    """The driver binary, compiled once per session."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler (g++ / $CXX) to build the index-math driver")
    out = tmp_path_factory.mktemp("cuda_index_math") / "driver"
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{HEADERS}", str(DRIVER),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (
        "the CUDA index-math headers do not compile on the host (they must build without "
        f"CUDA: MIPNET_HD, no CUDA headers):\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return out


def run_driver(driver: Path, *args: str) -> str:
    res = subprocess.run([str(driver), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"cuda_index_math_driver {' '.join(args)}:\n{res.stdout}{res.stderr}"
    return res.stdout


@pytest.mark.parametrize(
    "channels, pixels",
    [
        pytest.param("1-2048", "1,2,3,5", id="every-C-small-maps"),
        pytest.param(ODD_C, SMALL_HW, id="odd-C-odd-maps"),
        pytest.param("1,3,48,257,384", LARGE_HW, id="large-maps"),
        pytest.param("2048", "3072", id="C2048-64x48"),
    ],
)
def test_cuda_index_math_mimb_tiling(driver, channels, pixels):
    """MIMB: each element of x read once by one thread, n <= kRegVecs vectors per thread,
    aligned vectors; every (b, ct, sp) tile taken by one block; every channel partial of a
    tile written exactly once (NCHW: lane 0 of the plane; NHWC: every channel of the tile,
    up to 2048, through shared memory within its size); the [B, nsp, C] workspace filled."""
    run_driver(driver, "mimb", channels, pixels)


def test_cuda_index_math_mimb_catches_lost_partials(driver):
    """The check itself: with the partial writers of the old kernel (one channel per thread,
    so the channels of a channels-last tile past the 256th had no partial, issue 14) it
    fails exactly for the vectorised channels-last tiles wider than 256 channels."""
    res = subprocess.run([str(driver), "mimb-lost-partials", "255,256,257,264,384,2048", "1,48"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "partial of channel 256 in tile (b=0, ct=0, sp=0) written 0 times, expected 1" in res.stdout
    failed = {line.split(": ", 1)[1].split(" HW=")[0] for line in res.stdout.splitlines()
              if line.startswith("failed case: ")}
    assert failed == {"mimb C=264", "mimb C=384", "mimb C=2048"}, res.stdout


def test_cuda_index_math_nms_bitmask(driver):
    """OKS-NMS bitmask: the upper-triangle tiles, each visited once by the grid-stride loop
    (gridDim.y 1, 7, more than tiles); every pair r < c < n evaluated exactly once and stored
    at bit c % 64 of word (r, c / 64); every word the scan reads written exactly once (the
    workspace is not zeroed); all within the image's n x ceil(n/64) words; the mask
    kernel's joint staging a bijection onto its shared arrays."""
    run_driver(driver, "nms", "1,2,3,63,64,65,127,128,129,200,513,1000,1024,1025,2100")


def test_cuda_index_math_nms_greedy_shared_memory(driver):
    """Greedy NMS kernel: the shared-memory plan fits 48 KiB for K up to 1024 joints, float32
    and float64, any M and crossover; regions ordered, 16-aligned, disjoint; the transposed
    keypoint staging fills its region exactly once."""
    run_driver(driver, "greedy")


def test_cuda_index_math_decode(driver):
    """decode_heatmaps: blocks cover every (b, k) map once; block sizes whole warps within
    the launch bounds; a block's threads read every element of a contiguous map once (scalar
    head, 16-byte-aligned vectors, tail; any start alignment) and of a strided map once."""
    run_driver(driver, "decode")


def test_cuda_index_math_flip_merge(driver):
    """flip_merge: the grid-stride loop's incremental (b, k, y, x) digits equal the flat
    index's, so every output element is written once."""
    run_driver(driver, "flip")
