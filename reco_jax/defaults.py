"""Every field of a training config, with its default (Pascal VOC values of the ReCo paper).

The config files in configs/ start from `base_config()`; `train.validate_config` checks a
config against it.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field of a training config, with Pascal VOC values of the paper as defaults."""
  c = ml_collections.ConfigDict()
  c.dataset = 'reco_voc'
  c.data_dir = ''
  c.manual_dir = ''
  c.num_classes = 21
  c.labels = 200
  c.min_classes = 3
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
  c.method = 'classmix'
  c.reco = True
  c.model = ml_collections.ConfigDict(dict(
      name='deeplabv3p', backbone='resnet101', output_stride=16, rep_dim=256,
      dtype='float32'))
  c.init_weights = ''
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2.5e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, poly_power=0.9,
      min_learning_rate=1e-6))
  c.ema_decay = 0.99
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
  c.num_train_steps = 40000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.num_image_summaries = 4
  c.seed = 0
  return c
