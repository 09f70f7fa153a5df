"""Dataset configs: paper defaults, typed arguments, clear errors."""
import jax.numpy as jnp
import pytest

from configs import cityscapes
from configs import common
from configs import sun
from configs import toy
from configs import voc
from reco_jax import config_checks
from reco_jax import inputs
from reco_jax.models import deeplab

SCHEMA_FIELDS = set(common.base_config().keys())


@pytest.mark.parametrize('module, dataset, classes, crop, scale, batch, eval_size, min_classes', [
    (voc, 'reco_voc', 21, (321, 321), (0.5, 1.5), 10, (513, 513), 3),
    (cityscapes, 'reco_cityscapes', 19, (512, 512), (1.0, 1.0), 2, (512, 1024), 12),
    (sun, 'reco_sun_rgbd', 37, (321, 321), (0.5, 1.5), 5, (384, 512), 1),
])
def test_dataset_config_has_paper_defaults(module, dataset, classes, crop, scale, batch,
                                           eval_size, min_classes):
  c = module.get_config()
  assert set(c.keys()) == SCHEMA_FIELDS
  assert c.dataset == dataset and c.num_classes == classes
  assert tuple(c.crop_size) == crop and tuple(c.scale_range) == scale
  assert c.batch_size == batch and tuple(c.eval_size) == eval_size
  assert c.min_classes == min_classes
  assert c.method == 'classmix' and c.reco is True and c.partial == ''
  assert c.num_train_steps == 40000
  assert c.model.name == 'deeplabv3p' and c.model.backbone == 'resnet101'
  assert c.model.output_stride == 16 and c.model.rep_dim == 256
  opt = c.optimizer
  assert (opt.learning_rate, opt.momentum, opt.nesterov, opt.weight_decay, opt.poly_power,
          opt.min_learning_rate) == (2.5e-3, 0.9, True, 5e-4, 0.9, 1e-6)
  assert (c.ema_decay, c.strong_threshold, c.weak_threshold, c.reco_temperature) == (
      0.99, 0.97, 0.7, 0.5)
  assert (c.num_queries, c.num_negatives) == (256, 512)


def test_arguments_are_typed_from_defaults():
  c = voc.get_config('labels=600,method=cutmix,reco=False,seed=2,backbone=deeplabv2')
  assert c.labels == 600 and isinstance(c.labels, int)
  assert c.method == 'cutmix'
  assert c.reco is False
  assert c.seed == 2 and isinstance(c.seed, int)
  assert c.model.name == 'deeplabv2'
  assert voc.get_config('reco=true').reco is True
  assert voc.get_config('labels=0').labels == 0


def test_supervised_reads_twice_the_labelled_batch_however_the_method_is_set():
  for module, batch in ((voc, 10), (cityscapes, 2), (sun, 5)):
    by_argument = module.get_config('method=supervised')
    by_override = module.get_config()
    by_override.method = 'supervised'  # what --config.method=supervised does
    assert by_argument.to_dict() == by_override.to_dict()
    assert inputs.branch_batches(by_argument) == (2 * batch, 0)
    for method in ('cutout', 'cutmix', 'classmix'):
      assert inputs.branch_batches(module.get_config(f'method={method}')) == (batch, batch)


def test_misspelt_key_lists_valid_keys():
  with pytest.raises(ValueError, match='Unknown config argument') as err:
    voc.get_config('label=200')
  for key in ('labels', 'partial', 'method', 'reco', 'seed', 'backbone'):
    assert key in str(err.value)


@pytest.mark.parametrize('arg, expected', [
    ('labels=many', 'expected an integer'),
    ('reco=maybe', 'expected a boolean'),
    ('method=mixup', 'expected one of supervised, cutout, cutmix, classmix'),
    ('partial=p2', 'expected one of'),
    ('backbone=resnet', 'expected one of deeplabv3p, deeplabv2'),
    ('seed', 'needs a value'),
    ('labels=-5', 'number of labelled images'),
    ('partial=p1,labels=200', 'drop labels=200'),
])
def test_bad_value_says_what_was_expected(arg, expected):
  with pytest.raises(ValueError, match=expected):
    cityscapes.get_config(arg)


@pytest.mark.parametrize('arg, subset', [
    ('', 'class_balanced'),  # ReCo's settings
    ('method=classmix', 'class_balanced'),
    ('method=supervised', 'class_balanced'),
    ('method=pseudo_label', 'class_balanced'),
    ('method=classmix,pretrain=within', 'class_balanced'),
    ('method=supervised,pretrain=within', 'uniform'),  # Zhao et al.'s settings
    ('method=supervised,pretrain=cross', 'uniform'),
    ('method=pseudo_label,pretrain=within', 'uniform'),
    ('method=supervised,pretrain=within,subset=class_balanced', 'class_balanced'),
    ('method=classmix,subset=uniform', 'uniform'),
])
def test_subset_defaults_to_uniform_in_zhaos_settings_unless_given(arg, subset):
  for module in (voc, cityscapes, toy):
    assert module.get_config(arg).subset == subset


def test_zhaos_label_counts_are_accepted():
  for module, labels in ((voc, 2118), (cityscapes, 596)):
    c = module.get_config(f'labels={labels},method=supervised,pretrain=within')
    assert (c.labels, c.subset) == (labels, 'uniform')
    # runlocal: batches that split over the tests' 4 devices (and no cap on labels).
    small = module.get_config(f'labels={labels},method=pseudo_label,pretrain=within,runlocal')
    assert (small.labels, small.subset) == (labels, 'uniform')
    config_checks.validate_config(small)
  with pytest.raises(ValueError, match='expected one of class_balanced, uniform'):
    voc.get_config('subset=random')
  bad = voc.get_config()
  bad.subset = 'random'
  with pytest.raises(ValueError, match='config.subset'):
    config_checks.validate_config(bad)


def test_precision_sets_the_models_compute_dtype_only():
  for module in (voc, cityscapes, sun, toy):
    fp32, bf16 = module.get_config(), module.get_config('precision=bf16')
    assert (fp32.model.dtype, bf16.model.dtype) == ('float32', 'bfloat16')
    fp32.unlock().model.dtype = 'bfloat16'
    assert fp32.to_dict() == bf16.to_dict()  # Nothing else changes.
    assert deeplab.model_from_config(bf16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='expected one of fp32, bf16'):
    voc.get_config('precision=fp16')
  good = toy.get_config('precision=bf16,runlocal')
  config_checks.validate_config(good)
  good.model.dtype = 'float16'
  with pytest.raises(ValueError, match=r'config.model.dtype.*precision=fp32\|bf16'):
    config_checks.validate_config(good)


def test_partial_uses_every_image():
  c = voc.get_config('partial=p5')
  assert c.partial == 'p5' and c.labels == 0


def test_config_is_locked():
  c = voc.get_config()
  with pytest.raises(AttributeError):
    c.num_train_step = 5  # misspelt field
  c.num_train_steps = 5  # existing fields stay overridable (--config.x=y)
  assert c.num_train_steps == 5


def test_toy_config_is_tiny_and_semi_supervised():
  c = toy.get_config()
  assert set(c.keys()) == SCHEMA_FIELDS
  assert c.dataset == 'reco_toy' and c.num_classes == 9
  assert c.model.backbone == 'resnet_tiny' and c.model.rep_dim <= 64
  assert c.method == 'classmix' and c.reco and c.labels == 30
  small = toy.get_config('runlocal')
  assert small.dataset == 'reco_toy/tiny' and small.num_train_steps < c.num_train_steps


def test_runlocal_shrinks_a_paper_config():
  c = voc.get_config('runlocal,labels=60')
  assert c.model.backbone == 'resnet_tiny'
  assert c.num_train_steps <= 20 and max(c.crop_size) < 321
  assert c.labels == 60 and c.dataset == 'reco_voc'
