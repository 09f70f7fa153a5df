"""Names shared by the configs, the data, the steps and the tools, each defined once.

Importing this module imports nothing else, so that configs can read it cheaply. The method
names are the keys of the registry in `reco_jax.methods`.
"""
# The ignore label of every dataset (the reference maps it to -1).
VOID = 255
# The evaluation scalar of a run: what the trainer logs and keeps its best checkpoint by, and
# what the tools read.
MIOU_TAG = 'eval/miou'

# Partial-label modes (ReCo paper section 4.3): the fraction of each class's pixels kept per
# image; 'p0' keeps a single pixel.
PARTIAL_FRACTIONS = {'p0': 0.0, 'p1': 0.01, 'p5': 0.05, 'p25': 0.25}
# config.partial: '' is full labels.
PARTIALS = ('',) + tuple(PARTIAL_FRACTIONS)

# config.pretrain: label-based contrastive pretraining before training (Zhao et al., ICCV
# 2021) with the within-image or the cross-image loss, or none.
PRETRAINS = ('none', 'within', 'cross')

# config.subset: how the labelled images are drawn from the train images. 'class_balanced' is
# ReCo's rule (`splits.select_labelled`); 'uniform' a seeded uniform sample, as Zhao et al.'s
# label fractions (`splits.select_uniform`).
SUBSETS = ('class_balanced', 'uniform')

# Segmentation networks (config.model.name).
MODELS = ('deeplabv3p', 'deeplabv2')

# config precision=...: the compute dtype (config.model.dtype) of the model's convolutions and
# matmuls. Parameters, optimiser state, the teacher, BatchNorm statistics, losses and ReCo's
# sampling stay float32 either way.
PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16'}

# config.split: the pools the labelled subset may be drawn from, with the shipped id list of
# each ('' = every train image). PseudoSeg's partition (ReCo paper Table 2) draws from the
# 1,464 images of VOC 2012's original segmentation train list.
LABELLED_POOLS = {'': None, 'pseudoseg': 'voc_train_1464.txt'}

# config.init_weights: IMAGENET starts the backbone from torchvision's ImageNet weights of
# config.model.backbone (reco_jax/models/imagenet.py); SCRATCH (or '', as older configs have
# it) from the random initialisation; any other value is the path of a weights file or of a
# converted directory (reco_jax/models/convert.py).
IMAGENET = 'imagenet'
SCRATCH = 'none'
SCRATCH_VALUES = (SCRATCH, '')
