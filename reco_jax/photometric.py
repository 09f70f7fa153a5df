"""The reference's photometric augmentation, one set of parameters for both implementations.

The labelled branch (tf.data, `data/pipeline.py`) and the mixed unlabelled batch (on device,
`semi/augment.py`) get the same augmentation in the reference (`build_data.transform`, which
`batch_transform` also applies after mixing), on PIL images:
- colour jitter with probability 0.8: `ColorJitter((0.75, 1.25), (0.75, 1.25), (0.75, 1.25),
  (-0.25, 0.25))`, the four ops in a random order; on PIL images contrast and saturation blend
  with PIL's grey image, `convert('L')`, whose weights are ITU-R 601-2 luma;
- Gaussian blur with probability 0.5, sigma uniform in [0.15, 1.15] (PIL `GaussianBlur`);
- horizontal flip with probability 0.5.
"""
# PIL's convert('L'): L = R * 299/1000 + G * 587/1000 + B * 114/1000.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
JITTER_PROB = 0.8
JITTER_FACTOR = (0.75, 1.25)  # brightness, contrast and saturation factors
JITTER_HUE = 0.25  # hue shift in [-0.25, 0.25] of a turn
BLUR_PROB = 0.5
BLUR_SIGMA = (0.15, 1.15)
# Taps on each side of the blur kernel: more than 3 sigma at the largest sigma. The border is
# extended symmetrically (edge pixel repeated), which is closest to PIL's blur at the border.
BLUR_RADIUS = 4
FLIP_PROB = 0.5
