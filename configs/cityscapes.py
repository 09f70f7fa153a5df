"""Cityscapes at half resolution (ReCo paper): `--config=configs/cityscapes.py:labels=50`.

Arguments: labels=N (0 = all, default 50), partial=p0|p1|p5|p25, method=supervised|cutout|
cutmix|classmix|s4gan|pseudo_label, reco=True|False, pretrain=none|within|cross, seed=S,
backbone=deeplabv3p|deeplabv2, subset=class_balanced|uniform (how the labelled images are
drawn; uniform by default with pretrain and method=supervised|pseudo_label, as Zhao et al.'s
labels=596), precision=fp32|bf16, init_weights=imagenet|none|PATH (default imagenet:
torchvision's ImageNet weights, as the reference), runlocal.
"""
from configs import common
from reco_jax import names


def get_config(arg=None):
  return common.paper_config(
      dict(dataset='reco_cityscapes', num_classes=19, min_classes=12, crop_size=(512, 512),
           scale_range=(1.0, 1.0), eval_size=(512, 1024), batch_size=2, eval_batch_size=2,
           # S4GAN's self-training threshold for Cityscapes (the authors' train_s4GAN.py).
           s4gan_threshold=0.7, init_weights=names.IMAGENET),
      arg, default_labels=50)
