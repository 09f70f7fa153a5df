"""DeepLab / ResNet structure, initialisation, dtypes and the PyTorch-style resizes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.models import deeplab
from reco_jax.models import resize
from reco_jax.models import resnet


def abstract_variables(model, size):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros((1, size[0], size[1], 3)))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def random_variables(model, size=(64, 64), seed=0):
  """Variables with random values (cheaper than compiling every initialiser)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "'var'" in name or "'scale'" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, size))


@pytest.mark.parametrize('name,kwargs,expected,out_hw', [
    ('deeplabv3p', dict(num_classes=21), 59_520_693, 81),
    ('deeplabv3p', dict(num_classes=19), 59_520_179, 81),
    ('deeplabv3p', dict(num_classes=37), 59_524_805, 81),
    ('deeplabv3p', dict(num_classes=21, output_stride=8), 59_520_693, 81),
    ('deeplabv2', dict(num_classes=21), 44_573_076, 41),
])
def test_resnet101_models_have_reference_parameter_counts_and_output_sizes(
    name, kwargs, expected, out_hw):
  model = deeplab.build_model(name, **kwargs)
  images = jax.ShapeDtypeStruct((2, 321, 321, 3), jnp.float32)
  variables = abstract_variables(model, (321, 321))
  assert set(variables) == {'params', 'batch_stats'}
  assert count(variables['params']) == expected
  logits, rep = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert logits.shape == (2, out_hw, out_hw, kwargs['num_classes'])
  assert rep.shape == (2, out_hw, out_hw, 256)
  assert logits.dtype == rep.dtype == jnp.float32


@pytest.mark.parametrize('backbone,output_stride,expected', [
    ('resnet101', 16, (81, 41, 21, 21)),
    ('resnet50', 32, (81, 41, 21, 11)),
])
def test_resnet_stage_sizes_follow_output_stride(backbone, output_stride, expected):
  model = resnet.ResNet(backbone, output_stride)
  x = jnp.zeros((1, 321, 321, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  feats = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert tuple(feats[f'layer{i}'].shape[1] for i in range(1, 5)) == expected
  assert feats['layer1'].shape[-1] == 256 and feats['layer4'].shape[-1] == 2048
  # torchvision ResNet parameter counts without the fc layer.
  fc = 2048 * 1000 + 1000
  want = {'resnet50': 25_557_032, 'resnet101': 44_549_160}[backbone] - fc
  assert count(variables['params']) == want


def test_stage_dilations_follow_torchvision_rules():
  assert resnet.stage_dilations(16) == ((1, 1), (2, 1), (2, 1), (1, 2))
  assert resnet.stage_dilations(8) == ((1, 1), (2, 1), (1, 2), (1, 4))
  with pytest.raises(ValueError, match='output_stride'):
    resnet.stage_dilations(4)


def test_even_input_gives_quarter_resolution():
  model = deeplab.DeepLabV3Plus(19, backbone='resnet_tiny')
  x = jax.ShapeDtypeStruct((1, 64, 128, 3), jnp.float32)
  logits, _ = jax.eval_shape(functools.partial(model.apply, train=False),
                             abstract_variables(model, (64, 128)), x)
  assert logits.shape == (1, 16, 32, 19)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = deeplab.DeepLabV3Plus(5, backbone='resnet_tiny', rep_dim=8, dtype=jnp.bfloat16,
                                aspp_dim=16, low_level_dim=8, head_dim=16)
  abstract = abstract_variables(model, (64, 64))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
  variables = random_variables(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  step = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  (logits, rep), updates = step(variables, x)
  assert logits.dtype == rep.dtype == jnp.float32
  assert logits.shape == (2, 16, 16, 5) and rep.shape == (2, 16, 16, 8)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
  # The bf16 forward pass approximates the float32 one.
  ref = deeplab.DeepLabV3Plus(5, backbone='resnet_tiny', rep_dim=8, aspp_dim=16,
                              low_level_dim=8, head_dim=16)
  (ref_logits, _), _ = jax.jit(functools.partial(ref.apply, train=True,
                                                 mutable=['batch_stats']))(variables, x)
  err = jnp.max(jnp.abs(logits - ref_logits)) / jnp.max(jnp.abs(ref_logits))
  assert 0 < float(err) < 0.1


def test_batch_norm_uses_pytorch_eps_and_momentum():
  bn = resnet.batch_norm(train=True)
  x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, size=(2, 3, 3, 4)), jnp.float32)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  # Running averages move by 0.1 towards the batch statistics (PyTorch momentum 0.1).
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var, rtol=1e-5)
  frozen = resnet.batch_norm(train=False).apply({**variables, **updates}, x)
  np.testing.assert_allclose(
      frozen, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=1e-4, atol=1e-5)


def test_new_heads_use_pytorch_default_conv_init():
  conv = deeplab._head_conv(1024, 3, 16, use_bias=True, name=None)
  params = conv.init(jax.random.key(0), jnp.zeros((1, 3, 3, 16)))['params']
  bound = 1 / np.sqrt(16 * 3 * 3)  # fan_in counts the 3x3 window.
  for leaf in (params['kernel'], params['bias']):
    leaf = np.asarray(leaf)
    assert np.abs(leaf).max() <= bound
    # Uniform on [-bound, bound]: std bound / sqrt(3), extremes reach the bound.
    assert np.abs(leaf).max() > 0.98 * bound
    np.testing.assert_allclose(leaf.std(), bound / np.sqrt(3), rtol=0.05)


def test_build_model_rejects_bad_names_and_fields():
  with pytest.raises(ValueError, match=r"deeplabv2.*deeplabv3p"):
    deeplab.build_model('unet', num_classes=3)
  with pytest.raises(ValueError, match='output_stride'):
    deeplab.build_model('deeplabv2', num_classes=3, output_stride=16)
  with pytest.raises(ValueError, match='resnet_tiny'):
    deeplab.build_model('deeplabv3p', num_classes=3, backbone='resnet18')
  with pytest.raises(ValueError, match='resnet_tiny'):
    abstract_variables(deeplab.DeepLabV3Plus(3, backbone='resnet18'), (64, 64))
  assert deeplab.build_model('deeplabv2', num_classes=3, dtype='bfloat16').dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    deeplab.DeepLabV2(3, backbone='resnet_tiny').init(jax.random.key(0), jnp.zeros((64, 64, 3)))


def test_bilinear_align_corners_matches_pytorch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for (h, w), size in [((5, 7), (81, 33)), ((81, 81), (321, 321)), ((21, 13), (6, 4)),
                       ((4, 6), (1, 3)), ((3, 3), (3, 3))]:
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size,
                                           mode='bilinear', align_corners=True)
    got = resize.bilinear_align_corners(jnp.asarray(x), size)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  half = resize.bilinear_align_corners(jnp.ones((1, 3, 3, 2), jnp.bfloat16), (7, 5))
  assert half.dtype == jnp.bfloat16 and half.shape == (1, 7, 5, 2)
  with pytest.raises(TypeError, match='nearest'):
    resize.bilinear_align_corners(jnp.ones((1, 3, 3, 1), jnp.int32), (5, 5))


def test_nearest_matches_pytorch_including_float32_rounding_cases():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  # (2, 82) and (3, 123): float32 rounding moves an index away from the exact floor.
  for (h, w), size in [((321, 321), (81, 81)), ((513, 97), (129, 25)), ((2, 3), (82, 123)),
                       ((6, 5), (12, 3)), ((7, 7), (7, 7)), ((64, 48), (17, 11))]:
    labels = rng.integers(0, 256, size=(2, h, w)).astype(np.uint8)
    want = torch.nn.functional.interpolate(torch.from_numpy(labels[:, None]).float(),
                                           size=size, mode='nearest')[:, 0].numpy()
    got = resize.nearest(jnp.asarray(labels), size)
    assert got.dtype == jnp.uint8
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    feats = rng.normal(size=(1, h, w, 2)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(feats.transpose(0, 3, 1, 2)),
                                           size=size, mode='nearest').numpy()
    np.testing.assert_array_equal(resize.nearest(jnp.asarray(feats), size),
                                  want.transpose(0, 2, 3, 1))
  with pytest.raises(ValueError, match='size'):
    resize.nearest(jnp.zeros((1, 4, 4)), (0, 2))
