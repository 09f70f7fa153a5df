"""PyTorch parity and checkpoint import for the DeepLab models.

A small PyTorch model with the reference code's module names (torchvision Bottleneck layout,
the reference's stride-to-dilation rewrite and DeepLab heads) is built here, given
non-trivial BatchNorm statistics, saved, converted and compared with the Flax forward pass.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.models import convert
from reco_jax.models import deeplab
from reco_jax.models import resnet
import tolerances

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

# Two blocks in the dilated stages, so that the first-block / later-block dilations differ.
SPEC = resnet.ResNetSpec((1, 1, 2, 2), 8)
HEADS = dict(aspp_dim=16, low_level_dim=8, head_dim=16)
NUM_CLASSES = 5
REP_DIM = 12


class TorchBottleneck(nn.Module):
  """torchvision's Bottleneck: stride on the 3x3 conv."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    skip = x if self.downsample is None else self.downsample(x)
    return F.relu(y + skip)


class TorchResNet(nn.Module):
  """torchvision ResNet layout (names conv1, bn1, layerK.i..., fc)."""

  def __init__(self, spec):
    super().__init__()
    w = spec.width
    self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(w)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = w
    for k, blocks in enumerate(spec.stage_sizes):
      planes = w * 2**k
      layer = []
      for i in range(blocks):
        layer.append(TorchBottleneck(inplanes, planes, (1 if k == 0 else 2) if i == 0 else 1))
        inplanes = planes * 4
      setattr(self, f'layer{k + 1}', nn.Sequential(*layer))
    self.fc = nn.Linear(inplanes, 10)


def reference_dilate(layer, dilate):
  """The reference's stride-to-dilation rewrite of one ResNet stage."""
  for m in layer.modules():
    if isinstance(m, nn.Conv2d):
      if m.stride == (2, 2):
        m.stride = (1, 1)
        if m.kernel_size == (3, 3):
          m.dilation = m.padding = (dilate // 2, dilate // 2)
      elif m.kernel_size == (3, 3):
        m.dilation = m.padding = (dilate, dilate)


def conv_bn_relu(cin, cout, k, rate=1):
  return nn.Sequential(nn.Conv2d(cin, cout, k, padding=rate * (k // 2), dilation=rate,
                                 bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TorchPooling(nn.Sequential):

  def __init__(self, cin, cout):
    super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                     nn.BatchNorm2d(cout), nn.ReLU())

  def forward(self, x):
    return F.interpolate(super().forward(x), size=x.shape[-2:], mode='bilinear',
                         align_corners=False)


class TorchASPP(nn.Module):

  def __init__(self, cin, rates, dim):
    super().__init__()
    self.convs = nn.ModuleList([conv_bn_relu(cin, dim, 1)] +
                               [conv_bn_relu(cin, dim, 3, r) for r in rates] +
                               [TorchPooling(cin, dim)])
    self.project = conv_bn_relu(5 * dim, dim, 1)

  def forward(self, x):
    return self.project(torch.cat([c(x) for c in self.convs], dim=1))


def _take_resnet(model, resnet_):
  model.resnet_conv1, model.resnet_bn1 = resnet_.conv1, resnet_.bn1
  model.resnet_maxpool = resnet_.maxpool
  for k in range(1, 5):
    setattr(model, f'resnet_layer{k}', getattr(resnet_, f'layer{k}'))


def _run_resnet(model, x):
  x = model.resnet_maxpool(F.relu(model.resnet_bn1(model.resnet_conv1(x))))
  low = model.resnet_layer1(x)
  return low, model.resnet_layer4(model.resnet_layer3(model.resnet_layer2(low)))


class TorchDeepLabV3Plus(nn.Module):
  """Reference DeepLabV3+ module names, narrow widths."""

  def __init__(self, spec, output_stride):
    super().__init__()
    resnet_ = TorchResNet(spec)
    if output_stride == 8:
      reference_dilate(resnet_.layer3, 2)
      reference_dilate(resnet_.layer4, 4)
      rates = (12, 24, 36)
    else:
      reference_dilate(resnet_.layer4, 2)
      rates = (6, 12, 18)
    _take_resnet(self, resnet_)
    w, d = spec.width, HEADS['aspp_dim']
    self.ASPP = TorchASPP(w * 32, rates, d)
    self.project = conv_bn_relu(w * 4, HEADS['low_level_dim'], 1)
    cat = HEADS['low_level_dim'] + d
    self.classifier = self._head(cat, NUM_CLASSES)
    self.representation = self._head(cat, REP_DIM)

  @staticmethod
  def _head(cin, cout):
    hidden = HEADS['head_dim']
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1, bias=False),
                         nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, cout, 1))

  def forward(self, x):
    low, high = _run_resnet(self, x)
    feature = self.ASPP(high)
    low = self.project(low)
    feature = F.interpolate(feature, size=low.shape[2:], mode='bilinear', align_corners=True)
    cat = torch.cat([low, feature], dim=1)
    return self.classifier(cat), self.representation(cat)


class TorchClassifierV2(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.conv2d_list = nn.ModuleList(
        [nn.Conv2d(cin, NUM_CLASSES, 3, padding=r, dilation=r) for r in (6, 12, 18, 24)])

  def forward(self, x):
    return sum(c(x) for c in self.conv2d_list)


class TorchDeepLabV2(nn.Module):

  def __init__(self, spec):
    super().__init__()
    resnet_ = TorchResNet(spec)
    reference_dilate(resnet_.layer3, 2)
    reference_dilate(resnet_.layer4, 4)
    _take_resnet(self, resnet_)
    self.classifier = TorchClassifierV2(spec.width * 32)
    self.representation = nn.Sequential(nn.Conv2d(spec.width * 32, REP_DIM, 1))

  def forward(self, x):
    _, high = _run_resnet(self, x)
    return self.classifier(high), self.representation(high)


def randomise(model, seed):
  """Non-trivial BatchNorm affine params and running stats; larger head weights."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Conv2d) and m.bias is not None:
        m.bias.copy_(torch.randn(m.out_channels, generator=g) * 0.1)
  return model


def save_both(model, tmp_path, name):
  """Saves the state dict as .pth (with a DataParallel prefix) and as .safetensors."""
  from safetensors.torch import save_file
  state = model.state_dict()
  pth = tmp_path / f'{name}.pth'
  torch.save({f'module.{k}': v for k, v in state.items()}, pth)
  st = tmp_path / f'{name}.safetensors'
  save_file({k: v.contiguous() for k, v in state.items()}, str(st))
  return str(pth), str(st)


def flax_model(kind, output_stride=16):
  if kind == 'deeplabv2':
    return deeplab.build_model('deeplabv2', num_classes=NUM_CLASSES, backbone=SPEC,
                               rep_dim=REP_DIM)
  return deeplab.build_model('deeplabv3p', num_classes=NUM_CLASSES, backbone=SPEC,
                             output_stride=output_stride, rep_dim=REP_DIM, **HEADS)


def torch_model(kind, output_stride=16, seed=0):
  torch.manual_seed(seed)
  model = TorchDeepLabV2(SPEC) if kind == 'deeplabv2' else TorchDeepLabV3Plus(SPEC,
                                                                            output_stride)
  return randomise(model, seed)


def init_variables(model, seed=None):
  """Variables of `model`: abstract, or (with a seed) filled with random values.

  Real `init` would compile every initialiser; the conversion only needs the structure, and
  random values stand in for initialised heads.
  """
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))
  if seed is None:
    return abstract
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract)


def rel_err(a, b):
  """max |a - b| / max |b|, recorded as a ratio to DEEP_PASS (see tolerances.py)."""
  err = float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
  tolerances.record(err / tolerances.DEEP_PASS)
  return err


def nchw_to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # GPUs default to TF32 for float32 convolutions; parity needs full float32.
  with jax.default_matmul_precision('float32'):
    yield


@pytest.mark.parametrize('kind,output_stride', [('deeplabv3p', 16), ('deeplabv3p', 8),
                                                ('deeplabv2', 8)])
def test_eval_outputs_match_pytorch_on_odd_and_even_sizes(tmp_path, kind, output_stride):
  tmodel = torch_model(kind, output_stride).eval()
  pth, st = save_both(tmodel, tmp_path, kind)
  model = flax_model(kind, output_stride)
  template = init_variables(model)
  from_pth = convert.load_torch_weights(pth, template)
  from_st = convert.load_initial_weights(st, template)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_st)
  apply = jax.jit(functools.partial(model.apply, train=False))
  rng = np.random.default_rng(0)
  # 305 keeps every ASPP / V2 rate inside the feature map (so a wrong rate shows); 64x48 is
  # even, where asymmetric "SAME" padding would differ from PyTorch.
  for h, w in [(305, 305), (64, 48)]:
    x = rng.normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
      t_logits, t_rep = tmodel(torch.from_numpy(x))
    logits, rep = apply(from_st, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert logits.dtype == rep.dtype == jnp.float32
    assert logits.shape == nchw_to_nhwc(t_logits).shape, (h, w)
    assert rep.shape == nchw_to_nhwc(t_rep).shape, (h, w)
    assert rel_err(logits, nchw_to_nhwc(t_logits)) < tolerances.DEEP_PASS, (h, w)
    assert rel_err(rep, nchw_to_nhwc(t_rep)) < tolerances.DEEP_PASS, (h, w)


def test_train_mode_matches_pytorch_and_updates_running_stats_with_momentum_0_1(tmp_path):
  tmodel = torch_model('deeplabv3p', 16, seed=3).train()
  _, st = save_both(tmodel, tmp_path, 'v3p')
  model = flax_model('deeplabv3p', 16)
  variables = convert.load_torch_weights(st, init_variables(model))
  x = np.random.default_rng(1).normal(size=(2, 3, 65, 65)).astype(np.float32)
  with torch.no_grad():
    t_logits, t_rep = tmodel(torch.from_numpy(x))
  step = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  (logits, rep), updates = step(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert rel_err(logits, nchw_to_nhwc(t_logits)) < tolerances.DEEP_PASS
  assert rel_err(rep, nchw_to_nhwc(t_rep)) < tolerances.DEEP_PASS
  # Running means follow PyTorch's momentum 0.1 (variances differ by PyTorch's n/(n-1)).
  new_state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  got = updates['batch_stats']
  np.testing.assert_allclose(got['backbone']['layer3_1']['bn2']['mean'],
                             new_state['resnet_layer3.1.bn2.running_mean'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['aspp']['pool_bn']['mean'],
                             new_state['ASPP.convs.4.2.running_mean'], rtol=1e-4, atol=1e-5)


def _state(kind='deeplabv3p'):
  return {k: v.numpy().copy() for k, v in torch_model(kind).state_dict().items()}


def _save_safetensors(state, path):
  from safetensors.numpy import save_file
  save_file(state, str(path))
  return str(path)


def test_torchvision_checkpoint_fills_backbone_and_keeps_heads(tmp_path):
  torch.manual_seed(0)
  tv = randomise(TorchResNet(SPEC), 5)  # Plain torchvision names, fc included.
  path = _save_safetensors({k: v.numpy() for k, v in tv.state_dict().items()},
                           tmp_path / 'tv.safetensors')
  model = flax_model('deeplabv3p')
  template = init_variables(model, seed=1)
  loaded = convert.load_torch_weights(path, template)
  np.testing.assert_array_equal(
      loaded['params']['backbone']['layer3_1']['conv2']['kernel'],
      tv.layer3[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded['batch_stats']['backbone']['layer1_0']['downsample_bn']
                                ['var'], tv.layer1[0].downsample[1].running_var.numpy())
  for top in ('aspp', 'project_conv', 'classifier_out', 'representation_conv'):
    jax.tree.map(np.testing.assert_array_equal, loaded['params'][top],
                 template['params'][top])
  # The template itself is untouched.
  assert not np.array_equal(template['params']['backbone']['conv1']['kernel'],
                            loaded['params']['backbone']['conv1']['kernel'])
  # Abstract variables cannot stand in for the heads a torchvision checkpoint lacks.
  with pytest.raises(ValueError, match='pass initialised variables'):
    convert.load_torch_weights(path, init_variables(model))


@pytest.mark.parametrize('edit,expected', [
    ('unknown', 'unknown tensor extra.weight'),
    ('missing', 'missing tensor ASPP.convs.4.1.weight'),
    ('shape', 'tensor classifier.3.weight has shape'),
    ('torchvision_missing', 'missing tensor layer4.1.bn3.running_var'),
])
def test_mismatched_checkpoints_raise_naming_the_tensor(tmp_path, edit, expected):
  state = _state()
  if edit == 'unknown':
    state['extra.weight'] = np.zeros(3, np.float32)
  elif edit == 'missing':
    del state['ASPP.convs.4.1.weight']
  elif edit == 'shape':
    state['classifier.3.weight'] = np.zeros((NUM_CLASSES + 1, 16, 1, 1), np.float32)
  else:
    state = {k[len('resnet_'):]: v for k, v in state.items() if k.startswith('resnet_')}
    del state['layer4.1.bn3.running_var']
  path = _save_safetensors(state, tmp_path / 'bad.safetensors')
  with pytest.raises(convert.CheckpointMismatchError, match=expected.replace('.', r'\.')):
    convert.load_torch_weights(path, init_variables(flax_model('deeplabv3p')))


def test_v3plus_checkpoint_into_v2_names_the_mismatch(tmp_path):
  path = _save_safetensors(_state(), tmp_path / 'v3p.safetensors')
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r'missing tensor classifier\.conv2d_list\.0\.weight'):
    convert.load_torch_weights(path, init_variables(flax_model('deeplabv2')))


def test_converted_directory_round_trips_and_checks_structure(tmp_path):
  model = flax_model('deeplabv2')
  variables = convert.load_torch_weights(
      _save_safetensors(_state('deeplabv2'), tmp_path / 'v2.safetensors'),
      init_variables(model))
  out = tmp_path / 'converted'
  convert.save_converted(str(out), variables)
  with pytest.raises(FileExistsError):
    convert.save_converted(str(out), variables)
  restored = convert.load_initial_weights(str(out), init_variables(model, seed=7))
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  wider = deeplab.build_model('deeplabv2', num_classes=NUM_CLASSES + 2, backbone=SPEC,
                              rep_dim=REP_DIM)
  with pytest.raises(convert.CheckpointMismatchError, match=r'params/classifier_0/kernel'):
    convert.load_converted(str(out), init_variables(wider))


def test_load_initial_weights_rejects_unknown_paths(tmp_path):
  with pytest.raises(ValueError, match='neither'):
    convert.load_initial_weights(str(tmp_path / 'weights.npz'), {})


def test_cli_converts_safetensors_and_output_loads_back(tmp_path, capsys):
  out = tmp_path / 'out'
  # SPEC is not a named backbone, so the CLI test uses 'resnet_tiny' weights.
  torch.manual_seed(0)
  tiny = resnet.BACKBONES['resnet_tiny']
  tmodel = randomise(TorchDeepLabV3Plus(tiny, 16), 2)
  src = _save_safetensors({k: v.numpy() for k, v in tmodel.state_dict().items()},
                          tmp_path / 'tiny.safetensors')
  convert.main([src, str(out), '--model', 'deeplabv3p', '--num_classes', str(NUM_CLASSES),
                '--backbone', 'resnet_tiny', '--rep_dim', str(REP_DIM),
                '--aspp_dim', '16', '--low_level_dim', '8', '--head_dim', '16'])
  assert 'Wrote' in capsys.readouterr().out
  model = deeplab.build_model('deeplabv3p', num_classes=NUM_CLASSES, backbone='resnet_tiny',
                              rep_dim=REP_DIM, **HEADS)
  restored = convert.load_converted(str(out), init_variables(model))
  np.testing.assert_array_equal(restored['params']['classifier_out']['bias'],
                                tmodel.classifier[3].bias.detach().numpy())
  np.testing.assert_array_equal(restored['batch_stats']['aspp']['branch2_bn']['mean'],
                                tmodel.ASPP.convs[2][1].running_mean.numpy())
