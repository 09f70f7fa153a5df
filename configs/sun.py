"""SUN RGB-D, RGB only, 37 classes (ReCo paper): `--config=configs/sun.py:labels=150`.

Arguments: labels=N (0 = all, default 150), partial=p0|p1|p5|p25, method=supervised|cutout|
cutmix|classmix|s4gan|pseudo_label, reco=True|False, pretrain=none|within|cross, seed=S,
backbone=deeplabv3p|deeplabv2, subset=class_balanced|uniform, precision=fp32|bf16,
init_weights=imagenet|none|PATH (default imagenet: torchvision's ImageNet weights, as the
reference), runlocal.
"""
from configs import common
from reco_jax import names


def get_config(arg=None):
  return common.paper_config(
      dict(dataset='reco_sun_rgbd', num_classes=37, min_classes=1, crop_size=(321, 321),
           scale_range=(0.5, 1.5), eval_size=(384, 512), batch_size=5, eval_batch_size=4,
           # S4GAN's self-training threshold: the authors give none for SUN RGB-D, and 0.6 for
           # PASCAL VOC and for PASCAL-Context, whose 60 whole-scene classes are nearest to it.
           s4gan_threshold=0.6, init_weights=names.IMAGENET),
      arg, default_labels=150)
