"""End-to-end throughput (boxes/s) of :class:`mipnet.TopDownPredictor` against the
official-style pipeline (:class:`mipnet.official.OfficialPipeline`) on the same model.

Workload: the real COCO images and detector boxes of ``../shared/data/real/mmpose_subsets/coco``
(4 images, 118 boxes of an AP-56 person detector; skipped when absent), cycled image by image
until ``boxes`` boxes (the last image's list cut), with the flip test and OKS-NMS at 0.9.
Both pipelines start from the same decoded RGB arrays on the host (JPEG decoding is the same
for both and not timed) and end with COCO result dicts on the host.

Rows (``extra_info["backend"]``):

* ``official`` -- per box on the host ``cv2.warpAffine`` + normalisation, per instance a full
  network pass and a second one for the flip (flipped heatmaps round-trip through the host),
  NumPy ``get_final_preds`` and NumPy OKS-NMS (HRNet / MIPNet test code);
* ``predictor`` -- crops by ``grid_sample`` on the device, one ``forward_instances`` for all
  instances and both flips, ``flip_merge``, ``decode_heatmaps``, ``oks_nms_mask``; one
  device-to-host copy at the end.  On CUDA also in bf16 (autocast).

Configs: CUDA -- MIPNet HRNet-W32 (N=2, random weights) at 256x192, 200 boxes, batch 24 and 48
(boxes per network call; the predictor's network sees 2x that with the flip).  CPU -- a smoke
config only: SimpleBaseline-50 (N=2) at 64x32, 8 boxes, batch 8.

Timing: host wall clock of a whole call (pytest-benchmark's ``perf_counter`` timer; a CUDA
call ends with the results on the host, so the device work is inside).  ``extra_info``: op
``predictor``, backend, arch, input_size, batch, boxes, num_instances, boxes_per_s, results
(poses kept), and on predictor rows ``speedup_vs_official`` (the issue's target: >= 5x on
the GPU) when the official row of the same config ran first in this session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mipnet.data.transforms import read_image_rgb
from mipnet.models import build_model
from mipnet.official import OfficialPipeline
from mipnet.predictor import TopDownPredictor

from .common import device_name

_CANDIDATES = (Path(__file__).resolve().parents[1] / "../shared/data/real", Path("/work/shared/data/real"))
COCO_DIR = next((p.resolve() / "mmpose_subsets/coco" for p in _CANDIDATES if (p / "mmpose_subsets/coco").is_dir()),
                None)
DET_FILE = "test_coco_det_AP_H_56.json"
NUM_INSTANCES = 2
TARGET_SPEEDUP = 5.0

# device: (arch, input_size, boxes, batches, predictor dtypes, timed rounds)
CONFIGS = {
    "cpu": ("resnet50", (64, 32), 8, (8,), (torch.float32,), 3),
    "cuda": ("hrnet_w32", (256, 192), 200, (24, 48), (torch.float32, torch.bfloat16), 5),
}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _cases():
    for device, (arch, size, boxes, batches, dtypes, _) in CONFIGS.items():
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for batch in batches:
            rows = [("official", torch.float32)] + [("predictor", dt) for dt in dtypes]  # official first
            for backend, dtype in rows:
                yield pytest.param(device, backend, dtype, batch,
                                   id=f"{device}-{backend}-{DTYPE_IDS[dtype]}-{arch}-{size[0]}x{size[1]}-b{batch}",
                                   marks=marks)


_workloads: dict = {}
_official_boxes_per_s: dict = {}


def _workload(device: str):
    """(model, images, boxes, image ids) of a device config, built once per session."""
    if device not in _workloads:
        _workloads.clear()
        arch, _, n_boxes, _, _, _ = CONFIGS[device]
        dets = json.loads((COCO_DIR / DET_FILE).read_text())
        per_image: dict[int, list] = {}
        for d in dets:
            per_image.setdefault(d["image_id"], []).append([*d["bbox"], d["score"]])
        ids = sorted(per_image)
        rgb = {i: read_image_rgb(COCO_DIR / f"{i:012d}.jpg") for i in ids}
        images, boxes, image_ids, total, k = [], [], [], 0, 0
        while total < n_boxes:
            i = ids[k % len(ids)]
            b = np.array(per_image[i][: n_boxes - total])
            images.append(rgb[i])
            boxes.append(b)
            image_ids.append(k)
            total += len(b)
            k += 1
        torch.manual_seed(0)
        model = build_model(arch, num_instances=NUM_INSTANCES).to(device).eval()
        _workloads[device] = (model, images, boxes, image_ids)
    return _workloads[device]


@pytest.mark.parametrize("device, backend, dtype, batch", list(_cases()))
def test_predictor_throughput(benchmark, request, device, backend, dtype, batch):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
        request.getfixturevalue("gpu_bench_env")
    if COCO_DIR is None:
        pytest.skip("real data folder ../shared/data/real/mmpose_subsets/coco is absent")
    arch, size, n_boxes, _, _, rounds = CONFIGS[device]
    model, images, boxes, image_ids = _workload(device)
    if backend == "official":
        pipeline = OfficialPipeline(model, input_size=size, flip_test=True, batch_size=batch)
    else:
        pipeline = TopDownPredictor(model, input_size=size, flip_test=True, batch_size=batch, dtype=dtype)

    def fn():
        return pipeline.predict(images, boxes, image_ids)

    benchmark.group = f"predictor {arch} {size[0]}x{size[1]} b{batch} {device}"
    results = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0 if benchmark.disabled else 1, iterations=1)
    assert results and all(len(r["keypoints"]) == 51 and np.isfinite(r["score"]) for r in results)
    info = dict(
        op="predictor", backend=backend, mode=f"N={NUM_INSTANCES} flip", device=device,
        device_name=device_name(device),
        shape=f"{n_boxes}boxes@{size[0]}x{size[1]}", dtype=DTYPE_IDS[dtype], arch=arch,
        input_size=f"{size[0]}x{size[1]}", batch=batch, boxes=n_boxes, num_instances=NUM_INSTANCES,
        results=len(results), timer="perf_counter (end to end, results on the host)",
    )
    if benchmark.enabled and benchmark.stats is not None:
        median = float(benchmark.stats["median"])
        info.update(time_median_s=median, boxes_per_s=n_boxes / median)
        key = (device, batch)
        if backend == "official":
            _official_boxes_per_s[key] = info["boxes_per_s"]
        elif key in _official_boxes_per_s:
            info.update(speedup_vs_official=info["boxes_per_s"] / _official_boxes_per_s[key],
                        target_speedup=TARGET_SPEEDUP)
    benchmark.extra_info.update(info)
