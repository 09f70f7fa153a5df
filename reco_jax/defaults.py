"""Every field of a training config, with its default (Pascal VOC values of the ReCo paper).

The config files in configs/ start from `base_config()`; `config_checks.validate_config`
checks a config against it.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field of a training config, with Pascal VOC values of the paper as defaults."""
  c = ml_collections.ConfigDict()
  for fields in (_data_fields, _training_fields, _reco_fields, _baseline_fields,
                 _pretraining_fields, _schedule_fields):
    fields(c)
  return c


def _data_fields(c: ml_collections.ConfigDict) -> None:
  """The dataset, the labelled and unlabelled images, crops and batches."""
  c.dataset = 'reco_voc'
  c.data_dir = ''
  c.manual_dir = ''
  c.num_classes = 21
  c.labels = 200
  c.min_classes = 3
  # The labelled images: ReCo's class-balanced draw, or 'uniform' as Zhao et al.'s fractions.
  c.subset = 'class_balanced'
  c.partial = ''
  # Where the labelled subset comes from: '' = every train image (ReCo paper Table 1);
  # 'pseudoseg' = VOC's original 1,464-image train list (the PseudoSeg partition, Table 2).
  c.split = ''
  # Share of the unlabelled images used, seeded (ReCo paper Fig. 7c).
  c.unlabelled_fraction = 1.0
  c.crop_size = (321, 321)
  c.scale_range = (0.5, 1.5)
  c.eval_size = (513, 513)
  # Images of each branch per step (global). Methods without an unlabelled branch read
  # 2 x batch_size labelled images, as the reference's supervised runs.
  c.batch_size = 10
  c.eval_batch_size = 4


def _training_fields(c: ml_collections.ConfigDict) -> None:
  """The method, the model, where it starts, and the optimiser."""
  c.method = 'classmix'
  c.reco = True
  # model.dtype: the compute dtype of convolutions and matmuls, 'float32' or 'bfloat16' (the
  # config argument precision=fp32|bf16, names.PRECISIONS); parameters, optimiser state, the
  # teacher, BatchNorm statistics, losses and ReCo's sampling stay float32.
  c.model = ml_collections.ConfigDict(dict(
      name='deeplabv3p', backbone='resnet101', output_stride=16, rep_dim=256,
      dtype='float32'))
  # Where the network starts: 'imagenet' (torchvision's ImageNet weights of model.backbone, as
  # the reference; the paper configs' default), 'none' (from scratch) or a weights path.
  c.init_weights = 'none'
  # decay_epochs: the polynomial decay steps once per epoch of this many (the reference's
  # 200); 0 decays every step. head_lr_multiplier: the rate of every parameter outside the
  # backbone, relative to learning_rate (UniMatch's lr_multi; 1 in ReCo).
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2.5e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, poly_power=0.9,
      min_learning_rate=1e-6, decay_epochs=200, head_lr_multiplier=1.0))
  c.ema_decay = 0.99
  # The largest hue shift (in turns) of the colour jitter of labelled and mixed images; the
  # reference's 0.25. Lower it for data whose classes differ by hue.
  c.hue_jitter = 0.25


def _reco_fields(c: ml_collections.ConfigDict) -> None:
  """ReCo's loss and sampling, and the confidence thresholds of the Mean Teacher methods."""
  c.strong_threshold = 0.97
  c.weak_threshold = 0.7
  c.reco_temperature = 0.5
  c.num_queries = 256
  c.num_negatives = 512
  c.query_mode = 'hard'
  c.key_mode = 'active'
  c.average_prototypes = False
  # ReCo with a feature bank (paper section 4.4): a queue of K keys per class from earlier
  # steps, the key set of the loss; 0 = batch-mode ReCo. reco_bank_writes keys per class are
  # enqueued each step (at most K). See reco_jax/losses/reco_bank.py.
  c.reco_bank_size = 0
  c.reco_bank_writes = 64
  # Semi-supervised steps: recompute the labelled student pass in the backward pass (one more
  # forward pass) so that only one pass's activations are held at a time; same gradients, less
  # memory with ReCo (see benchmarks/README.md).
  c.recompute_labelled = False


def _baseline_fields(c: ml_collections.ConfigDict) -> None:
  """The settings of S4GAN and UniMatch."""
  # S4GAN (method=s4gan; Mittal et al., the authors' train_s4GAN.py): the segmentation loss
  # is CE + s4gan_fm_weight x feature matching + s4gan_st_weight x self-training on the
  # unlabelled images whose discriminator score exceeds s4gan_threshold (the authors' 0.6 for
  # VOC, 0.7 for Cityscapes); the discriminator trains with Adam (lr, betas) and polynomial
  # decay of power s4gan_poly_power over num_train_steps.
  c.s4gan_fm_weight = 0.1
  c.s4gan_st_weight = 1.0
  c.s4gan_threshold = 0.6
  c.s4gan_learning_rate = 1e-4
  c.s4gan_betas = (0.9, 0.99)
  c.s4gan_poly_power = 0.9
  # UniMatch (method=unimatch; Yang et al., the authors' unimatch.py): its pseudo-labels count
  # where their confidence is >= unimatch_threshold (the authors' 0.95).
  c.unimatch_threshold = 0.95


def _pretraining_fields(c: ml_collections.ConfigDict) -> None:
  """Zhao et al.'s contrastive pretraining and pseudo-label stages."""
  # Label-based contrastive pretraining (Zhao et al., ICCV 2021): 'within' or 'cross' runs a
  # pretraining stage of pretrain_steps on the labelled images before training (workdir
  # sub-folders pretrain/ and finetune/, see reco_jax/stages.py). The paper fixes the loss and
  # its temperature; steps, optimiser, head widths and distortions are ours.
  c.pretrain = 'none'
  c.pretrain_steps = 5000
  c.pretrain_optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2.5e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, poly_power=0.9,
      min_learning_rate=1e-6, decay_epochs=200, head_lr_multiplier=1.0))
  c.contrast_temperature = 0.07  # The paper's.
  # Projection head 1x1 conv widths (the last one is the embedding; 256 throughout in the
  # released code), on the network's last hidden feature map resized to
  # ceil(crop / embedding_stride): the loss compares every pair of pixels of an image, so its
  # memory grows with the fourth power of the embedding map's side.
  c.projection_dims = (256, 256)
  c.embedding_stride = 8
  # The second view's colour distortion (SimCLR's, strength 0.5): factor ranges 1 +- s, hue
  # shift +- hue, applied with jitter_prob; then grey with grey_prob.
  c.distortion = ml_collections.ConfigDict(dict(
      brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_prob=0.8, grey_prob=0.2))
  # method=pseudo_label (Zhao et al., supplementary section 2): pixels of the first model's
  # predictions on the unlabelled images whose confidence is below this become void.
  c.pseudo_label_threshold = 0.0


def _schedule_fields(c: ml_collections.ConfigDict) -> None:
  """Steps, logging, evaluation and checkpoint cadences, and the seed."""
  c.num_train_steps = 40000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.num_image_summaries = 4
  c.seed = 0
