"""mipnet: reference MIPNet models, N-instance inference, data, training and evaluation.

Built on the fused ops of :mod:`mipnet_kernels`.  Sub-packages:

- :mod:`mipnet.models`  HRNet / SimpleBaseline and their MIPNet versions, checkpoint loading;
- :mod:`mipnet.data`    COCO-format datasets, multi-instance targets, synthetic crowds;
- :mod:`mipnet.predictor` :class:`TopDownPredictor`: images + person boxes -> COCO keypoint results
  on the device (:mod:`mipnet.official`: the official-style pipeline it is measured against);
"""

from .predictor import TopDownPredictor

__version__ = "0.1.0"
