"""Pascal VOC 2012 + SBD (ReCo paper): `--config=configs/voc.py:labels=200,method=classmix`.

Arguments: labels=N (0 = all, default 200), partial=p0|p1|p5|p25, method=supervised|cutout|
cutmix|classmix|s4gan|pseudo_label, reco=True|False, pretrain=none|within|cross, seed=S,
backbone=deeplabv3p|deeplabv2, split=pseudoseg (the
labelled images drawn from VOC's original 1,464 train images, ReCo paper Table 2: labels=92,
183, 366, 732), unlabelled_fraction=F (Fig. 7c), subset=class_balanced|uniform (how the
labelled images are drawn; uniform by default with pretrain and method=supervised|pseudo_label,
as Zhao et al.'s labels=2118), precision=fp32|bf16, init_weights=imagenet|none|PATH (default
imagenet: torchvision's ImageNet weights, as the reference), runlocal.
"""
from configs import common
from reco_jax import names


def get_config(arg=None):
  return common.paper_config(
      dict(dataset='reco_voc', num_classes=21, min_classes=3, crop_size=(321, 321),
           scale_range=(0.5, 1.5), eval_size=(513, 513), batch_size=10, eval_batch_size=4,
           init_weights=names.IMAGENET),
      arg, default_labels=200)
