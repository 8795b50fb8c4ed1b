"""Round trip on real annotations: COCO val2017 (mini), MMPose's COCO / CrowdPose / OCHuman
test subsets (``../shared/data/real``; skipped when absent).

For every person with visible keypoints: the HRNet top-down crop (box -> centre/scale with
aspect ratio 192/256 and x1.25 padding; 256x192 input, 64x48 heatmap), heatmaps rendered as
sigma-2 Gaussians at the keypoints' exact sub-pixel heatmap positions (what a well-trained
network approximates), decoded by every backend and mode with ``affine`` = HRNet's heatmap
-> image transform, and compared with the annotated image keypoints.

Tolerances, in heatmap pixels; one heatmap pixel is ``s = 200 * scale / 48`` image pixels
(the padded box width over the heatmap width, the same vertically), so each bound below is
multiplied by ``s`` per person, plus 1e-3 image px for the float32 affine (coordinates up to
~640 px carry ~1e-4 px of rounding):

* argmax: <= 0.5 (max norm) for keypoints inside the heatmap;
* quarter: <= 0.25 where HRNet's interior guard applies (>= 2 px from the border), <= 0.5
  elsewhere inside the heatmap;
* dark and udp: <= 1e-3 for keypoints >= 6 px (3 sigma) from the heatmap border, where the
  blob and its blur are whole.  What is left is the method's own bias: the 11-tap blur of a
  sampled Gaussian is not exactly Gaussian (measured: <= 3e-4 px for DARK's two-pixel
  differences, <= 1e-4 px for UDP's).  Closer to the border DARK's zero padding and UDP's
  reflection bias both methods by design (up to ~1 px for UDP at the edge), so there we
  check only that every backend agrees with the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mipnet_kernels as mk
import anchors as na
from mipnet_kernels.ops.decode import decode_heatmaps_reference, flip_index_from_pairs, flip_merge_reference
from utils import (
    affine_rounding_tol,
    assert_exact,
    backend_params,
    check_refined,
    decode_on,
    flip_merge_on,
    skip_unless_runs,
)

_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "../shared/data/real",
    Path("/work/shared/data/real"),
)
REAL = next((p.resolve() for p in _CANDIDATES if p.is_dir()), None)

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(REAL is None, reason="real data folder ../shared/data/real is absent"),
]

DATASETS = {
    "coco_val_mini": "coco_val_mini/person_keypoints_val2017.json",
    "mmpose_coco": "mmpose_subsets/coco/test_coco.json",
    "crowdpose": "mmpose_subsets/crowdpose/test_crowdpose.json",
    "ochuman": "mmpose_subsets/ochuman/test_ochuman.json",
}
HM_H, HM_W, SIGMA = 64, 48, 2.0
MODES = ("argmax", "quarter", "dark", "udp")
INTERP_PERSONS = 2  # Triton under the interpreter decodes only the first people of each set

_cache: dict = {}


def _load(name: str) -> dict:
    """Per person: heatmap-space keypoints, heatmap->image affine, visibility, image keypoints."""
    if name in _cache:
        return _cache[name]
    path = REAL / DATASETS[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    data = json.loads(path.read_text())
    pos, affines, vis, kps, px_scale = [], [], [], [], []
    for ann in data["annotations"]:
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        x, y, w, h = ann["bbox"]
        if not (kp[:, 2] > 0).any() or w <= 0 or h <= 0:
            continue
        center, scale = na.box_to_center_scale(x, y, w, h, aspect_ratio=192.0 / 256.0, padding=1.25)
        to_hm = na.get_affine_transform(center, scale, 0, [HM_W, HM_H])
        to_img = na.get_affine_transform(center, scale, 0, [HM_W, HM_H], inv=1)
        pos.append(kp[:, :2] @ to_hm[:, :2].T + to_hm[:, 2])
        affines.append(to_img)
        vis.append(kp[:, 2] > 0)
        kps.append(kp[:, :2])
        px_scale.append(float(scale[0]) * 200.0 / HM_W)
    assert pos, f"no person with visible keypoints in {path}"
    pos, vis = np.stack(pos), np.stack(vis)
    K = pos.shape[1]
    assert K == (14 if name == "crowdpose" else 17)
    margin = np.minimum(np.minimum(pos[..., 0], HM_W - 1 - pos[..., 0]), np.minimum(pos[..., 1], HM_H - 1 - pos[..., 1]))
    out = {
        "pos": pos,
        "affine": torch.from_numpy(np.stack(affines)).float(),
        "vis": torch.from_numpy(vis),
        "kp": torch.from_numpy(np.stack(kps)),
        "scale": torch.tensor(px_scale, dtype=torch.float64)[:, None],
        "margin": torch.from_numpy(margin),
        "heatmaps": _render(pos, vis),
        "pairs": mk.CROWDPOSE_FLIP_PAIRS if K == 14 else mk.COCO_FLIP_PAIRS,
    }
    _cache[name] = out
    return out


def _render(pos: np.ndarray, vis: np.ndarray, mirror: bool = False) -> torch.Tensor:
    """sigma-2 Gaussians at the exact positions ([N, K, H, W] float32); invisible joints: zeros."""
    xs = np.arange(HM_W, dtype=np.float64)[None, None, None, :]
    ys = np.arange(HM_H, dtype=np.float64)[None, None, :, None]
    cx = pos[..., 0, None, None]
    if mirror:
        cx = (HM_W - 1) - cx
    d2 = (xs - cx) ** 2 + (ys - pos[..., 1, None, None]) ** 2
    hm = np.exp(-d2 / (2 * SIGMA * SIGMA)) * vis[..., None, None]
    return torch.from_numpy(hm).float()


def _subset(d: dict, n: int | None) -> dict:
    if n is None:
        return d
    return {k: (v[:n] if isinstance(v, (torch.Tensor, np.ndarray)) else v) for k, v in d.items()}


def _check_round_trip(d: dict, coords: torch.Tensor, mode: str, what: str) -> int:
    """Assert the module docstring's bounds; returns how many keypoints were checked."""
    err_hm = ((coords.double().cpu() - d["kp"]).abs() - 1e-3).clamp_min(0).amax(-1) / d["scale"]
    inside = d["vis"] & (d["margin"] >= 0)
    if mode == "argmax":
        sel, bound = inside, 0.5
    elif mode == "quarter":
        guard = d["vis"] & (d["margin"] >= 2)
        assert bool((err_hm[inside] <= 0.5 + 1e-6).all()), f"{what}: quarter > 0.5 px near the border"
        sel, bound = guard, 0.25
    else:
        sel, bound = d["vis"] & (d["margin"] >= 3 * SIGMA), 1e-3
    assert int(sel.sum()) > 0
    worst = float(err_hm[sel].max())
    assert worst <= bound + 1e-6, f"{what}: {mode} round trip off by {worst:.4g} heatmap px (bound {bound})"
    return int(sel.sum())


@pytest.mark.parametrize("backend, device, dataset", backend_params(list(DATASETS)))
def test_round_trip(backend, device, dataset):
    dev = skip_unless_runs(backend, device)
    d = _subset(_load(dataset), INTERP_PERSONS if (backend, device) == ("triton", "cpu") else None)
    hm, affine = d["heatmaps"], d["affine"]
    for mode in MODES:
        coords, scores = decode_on(backend, hm.to(dev), mode, affine.to(dev))
        ref_c, ref_s = decode_heatmaps_reference(hm, mode, affine, 11)
        assert_exact(scores, ref_s, f"{dataset}/{mode} scores")
        assert bool((scores.cpu()[~d["vis"]] == 0).all())
        if mode in ("argmax", "quarter"):  # exact in heatmap pixels, float32 rounding after the affine
            plain, _ = decode_on(backend, hm.to(dev), mode)
            assert_exact(plain, decode_heatmaps_reference(hm, mode, None, 11)[0], f"{dataset}/{mode}")
            tol = affine_rounding_tol(plain, affine)
            assert bool(((coords.cpu().double() - ref_c.double()).abs() <= tol).all()), f"{dataset}/{mode} affine"
        else:
            check_refined(coords, hm, mode, affine, 11, ref_c, what=f"{dataset}/{mode}")
        _check_round_trip(d, coords, mode, f"{backend}/{dataset}")


@pytest.mark.parametrize("backend, device, dataset", backend_params(list(DATASETS), ["crowdpose", "ochuman"]))
def test_flip_test_round_trip(backend, device, dataset):
    """Heatmaps of the mirrored crop (joints swapped, exact mirror positions) merged without
    the shift give back the original keypoints."""
    dev = skip_unless_runs(backend, device)
    d = _subset(_load(dataset), INTERP_PERSONS if (backend, device) == ("triton", "cpu") else None)
    K = d["pos"].shape[1]
    idx = flip_index_from_pairs(d["pairs"], K)
    # joint idx[k] of the mirrored crop shows keypoint k, mirrored
    flipped = torch.empty_like(d["heatmaps"])
    flipped[:, idx] = _render(d["pos"], d["vis"].numpy(), mirror=True)
    merged = flip_merge_on(backend, d["heatmaps"].to(dev), flipped.to(dev), d["pairs"], shift=False)
    assert_exact(merged, flip_merge_reference(d["heatmaps"], flipped, idx, False), f"{dataset} flip_merge")
    assert (merged.cpu() - d["heatmaps"]).abs().max() <= 1e-6
    coords, _ = decode_on(backend, merged, "dark", d["affine"].to(dev))
    _check_round_trip(d, coords, "dark", f"{backend}/{dataset}/flip")
