"""The built-in toy dataset: the whole system on a laptop CPU in a few minutes.

`python -m reco_jax.main --config=configs/toy.py --workdir=/tmp/reco_toy` trains a tiny
DeepLabV3+ (ResNet 'resnet_tiny' with heads of 64 channels) with ClassMix + ReCo from 30
labelled images of `reco_toy` (texture classes, generated on first use) for 2000 steps, and
evaluates it on the 500 validation images every 500 steps. What it takes and what each method
reaches in this budget: benchmarks/results/label_efficiency.md.

Arguments as the paper configs: labels=N (0 = all, default 30), partial=p0|p1|p5|p25,
method=supervised|cutout|cutmix|classmix|s4gan|pseudo_label, reco=True|False, seed=S,
backbone=deeplabv3p|deeplabv2, pretrain=none|within|cross, subset=class_balanced|uniform,
precision=fp32|bf16, init_weights=none|PATH (default none: the tiny backbone has no ImageNet
weights), runlocal (a few steps on the 48-image 'reco_toy/tiny').
"""
from configs import common


def get_config(arg=None):
  return common.paper_config(
      dict(dataset='reco_toy', num_classes=9, min_classes=2, crop_size=(64, 64),
           scale_range=(0.75, 1.25), eval_size=(96, 96), batch_size=8, eval_batch_size=8,
           model=dict(backbone='resnet_tiny', rep_dim=32, aspp_dim=64, low_level_dim=32,
                      head_dim=64),
           optimizer=dict(learning_rate=0.1),
           # pretrain=within|cross: 2,000 pretraining steps (as many as fine-tuning) on the
           # decoder's 16x16 map, chosen from the length study in benchmarks/README.md; the
           # projection head as wide as the toy's heads throughout (the released code: 256).
           pretrain_steps=2000, pretrain_optimizer=dict(learning_rate=0.1),
           projection_dims=(64, 64), embedding_stride=4,
           num_queries=64, num_negatives=128, num_train_steps=2000, log_every_steps=50,
           eval_every_steps=500, checkpoint_every_steps=500,
           # S4GAN's self-training threshold: the authors' VOC value (the toy has none).
           s4gan_threshold=0.6),
      arg, default_labels=30)
