"""Keypoint conventions shipped with the library: sigmas and left/right flip pairs."""

# COCO 17 joints: nose, l/r eye, l/r ear, l/r shoulder, l/r elbow, l/r wrist, l/r hip,
# l/r knee, l/r ankle (pycocotools COCOeval.kpt_oks_sigmas).
COCO_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

# CrowdPose 14 joints: l/r shoulder, l/r elbow, l/r wrist, l/r hip, l/r knee, l/r ankle,
# head, neck (crowdpose-api COCOeval).
CROWDPOSE_SIGMAS = (
    0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
    0.087, 0.087, 0.089, 0.089, 0.079, 0.079,
)
CROWDPOSE_FLIP_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11))
