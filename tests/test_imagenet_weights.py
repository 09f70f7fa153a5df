"""ImageNet initial weights: pinned download, cache, checks, errors, and torchvision parity.

The Hub is played by a loopback HTTP server that answers `resolve` requests with a redirect
to the file, as the Hub does for LFS files, and serves a small safetensors file made here:
a 'resnet_tiny' trunk under torchvision's tensor names, with an `fc` head as timm's files
have.
"""
import functools
import hashlib
import http.server
import io
import json
import os
import socket
import threading

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cityscapes
from configs import sun
from configs import toy
from configs import voc
from reco_jax import console as console_lib
from reco_jax import names
from reco_jax import parallel
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax import train
from reco_jax.models import convert
from reco_jax.models import deeplab
from reco_jax.models import imagenet
from reco_jax.models import resnet

BACKBONE = 'resnet_tiny'
REVISION = '0123456789abcdef0123456789abcdef01234567'


def tiny_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random torchvision-named tensors of the resnet_tiny trunk, plus timm's `fc` head."""
  rng = np.random.default_rng(seed)
  state = {name: rng.normal(size=shape).astype(np.float32)
           for name, shape in imagenet.expected_tensors(BACKBONE).items()}
  for name in state:
    if name.endswith('running_var'):
      state[name] = np.abs(state[name]) + 0.5
  state['fc.weight'] = rng.normal(size=(10, 256)).astype(np.float32)
  state['fc.bias'] = np.zeros(10, np.float32)
  return state


def to_bytes(state: dict[str, np.ndarray]) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save(state)


def source_for(data: bytes, **changes) -> imagenet.Source:
  fields = dict(description='Test ResNet-tiny', repo_id='test/resnet_tiny.tv_in1k',
                revision=REVISION, sha256=hashlib.sha256(data).hexdigest())
  fields.update(changes)
  return imagenet.Source(**fields)


class FakeHub:
  """`/<repo>/resolve/<revision>/<file>` -> 302 -> `/blobs/<sha256>` on 127.0.0.1.

  mode: 'ok'; 'truncate' (the body stops half-way and the connection closes).
  """

  def __init__(self, source: imagenet.Source, data: bytes, reported_sha256: str | None = None):
    self.mode = 'ok'
    self.requests = []
    resolve = (f'/{source.repo_id}/resolve/{source.revision or imagenet.UNPINNED_REVISION}/'
               f'{source.filename}')
    blob = f'/blobs/{hashlib.sha256(data).hexdigest()}'
    reported = reported_sha256 or hashlib.sha256(data).hexdigest()
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_HEAD(self):  # pylint: disable=invalid-name
        hub.requests.append(f'HEAD {self.path}')
        if self.path != resolve:
          self.send_error(404)
          return
        self.send_response(302)
        self.send_header('Location', blob)
        self.send_header('X-Linked-Etag', f'"{reported}"')
        self.send_header('X-Repo-Commit', REVISION)
        self.send_header('Content-Length', '0')
        self.end_headers()

      def do_GET(self):  # pylint: disable=invalid-name
        hub.requests.append(self.path)
        if self.path == blob:
          self.send_response(200)
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data[:len(data) // 2] if hub.mode == 'truncate' else data)
          self.close_connection = hub.mode == 'truncate'
        else:
          self.send_error(404)

      def log_message(self, *args):
        del args

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, in every test.
    self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
    self._thread.start()

  def stop(self):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
  """(served bytes, a FakeHub serving them) with the cache and endpoint set as a user would."""
  data = to_bytes(tiny_state_dict())
  source = source_for(data)
  hub = FakeHub(source, data)
  monkeypatch.setitem(imagenet.SOURCES, BACKBONE, source)
  monkeypatch.setenv(imagenet.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, hub.url)
  monkeypatch.setenv('no_proxy', '127.0.0.1')
  yield data, hub
  hub.stop()


def cache_contents(tmp_path) -> list[str]:
  folder = tmp_path / 'cache'
  return sorted(os.listdir(folder)) if folder.exists() else []


def closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'http://127.0.0.1:{s.getsockname()[1]}'


def test_paper_configs_start_from_imagenet_and_the_toy_from_scratch():
  for module in (voc, cityscapes, sun):
    assert module.get_config().init_weights == names.IMAGENET
    assert module.get_config('init_weights=none').init_weights == names.SCRATCH
    # The smoke run's tiny backbone has no ImageNet weights.
    assert module.get_config('runlocal').init_weights == names.SCRATCH
  assert voc.get_config('init_weights=/w/r101.safetensors').init_weights == '/w/r101.safetensors'
  assert toy.get_config().init_weights == names.SCRATCH


def test_download_is_pinned_checked_cached_and_loads(weights_env, tmp_path):
  data, hub = weights_env
  weights = imagenet.resolve(names.IMAGENET, BACKBONE, progress=False)
  path = tmp_path / 'cache' / 'resnet_tiny_imagenet.safetensors'
  assert weights.path == str(path) and path.read_bytes() == data
  assert hub.requests == [f'HEAD /test/resnet_tiny.tv_in1k/resolve/{REVISION}/model.safetensors',
                          f'/blobs/{hashlib.sha256(data).hexdigest()}']
  assert json.loads(imagenet.record_file(path).read_text()) == {
      'repo_id': 'test/resnet_tiny.tv_in1k', 'revision': REVISION,
      'sha256': hashlib.sha256(data).hexdigest()}
  assert weights.description == (f'Test ResNet-tiny from {path}, sha256 '
                                 f'{hashlib.sha256(data).hexdigest()}')
  assert cache_contents(tmp_path) == ['resnet_tiny_imagenet.safetensors',  # No temp file.
                                      'resnet_tiny_imagenet.safetensors.json']
  # Into a DeepLab: the trunk takes the file's tensors, `fc` is ignored, the heads stay.
  model = deeplab.build_model('deeplabv3p', num_classes=3, backbone=BACKBONE, rep_dim=8,
                              aspp_dim=16, low_level_dim=8, head_dim=16)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 33, 33, 3)))
  template = jax.tree.map(lambda s: jnp.full(s.shape, 7.0, s.dtype), shapes)
  loaded = convert.load_initial_weights(weights.path, template)
  state = tiny_state_dict()
  np.testing.assert_array_equal(loaded['params']['backbone']['layer2_0']['conv2']['kernel'],
                                state['layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded['batch_stats']['backbone']['bn1']['var'],
                                state['bn1.running_var'])
  np.testing.assert_array_equal(loaded['params']['classifier_out']['bias'], 7.0)


def test_a_cached_file_is_used_without_the_server(weights_env, monkeypatch):
  data, hub = weights_env
  first = imagenet.fetch(BACKBONE, progress=False)
  hub.stop()
  hub.stop = lambda: None
  requests = len(hub.requests)
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, closed_port_url())
  assert imagenet.fetch(BACKBONE, progress=False) == first
  imagenet._VERIFIED.clear()  # A later run: hashed again, still offline.
  assert imagenet.resolve(names.IMAGENET, BACKBONE).path == str(first)
  assert len(hub.requests) == requests and first.read_bytes() == data


def test_a_download_with_the_wrong_checksum_is_an_error_and_is_not_kept(weights_env, tmp_path,
                                                                        monkeypatch):
  data, _ = weights_env
  monkeypatch.setitem(imagenet.SOURCES, BACKBONE, source_for(data, sha256='0' * 64))
  with pytest.raises(imagenet.ChecksumError, match=r'reports sha256 [0-9a-f]{64} .* not the '
                                                   'pinned 0000'):
    imagenet.fetch(BACKBONE, progress=False)
  assert cache_contents(tmp_path) == []


def test_bytes_that_are_not_what_the_hub_reports_are_not_kept(tmp_path, monkeypatch):
  data = to_bytes(tiny_state_dict())
  source = source_for(data, sha256=None)
  hub = FakeHub(source, data, reported_sha256='1' * 64)
  monkeypatch.setitem(imagenet.SOURCES, BACKBONE, source)
  try:
    with pytest.raises(imagenet.ChecksumError, match=r'has sha256 [0-9a-f]{64}, not the 1111'):
      imagenet.fetch(BACKBONE, progress=False, directory=tmp_path / 'cache',
                     endpoint=hub.url)
  finally:
    hub.stop()
  assert cache_contents(tmp_path) == []


def test_a_corrupt_cached_file_is_an_error_naming_it_to_delete(weights_env, tmp_path):
  imagenet.fetch(BACKBONE, progress=False)
  path = tmp_path / 'cache' / 'resnet_tiny_imagenet.safetensors'
  with open(path, 'r+b') as f:
    f.seek(-3, io.SEEK_END)
    f.write(b'xyz')
  imagenet._VERIFIED.clear()  # A later run (the file may keep its modification time).
  with pytest.raises(imagenet.ChecksumError) as err:
    imagenet.fetch(BACKBONE, progress=False)
  assert str(path) in str(err.value) and f'rm {path}' in str(err.value)


def test_an_interrupted_download_leaves_nothing_that_is_used_later(weights_env, tmp_path):
  data, hub = weights_env
  hub.mode = 'truncate'
  with pytest.raises(imagenet.DownloadError, match=f'stopped after {len(data) // 2} of '
                                                   f'{len(data)} bytes'):
    imagenet.fetch(BACKBONE, progress=False)
  assert cache_contents(tmp_path) == []
  hub.mode = 'ok'
  path = imagenet.fetch(BACKBONE, progress=False)
  assert path.read_bytes() == data and len(hub.requests) == 4
  assert cache_contents(tmp_path) == ['resnet_tiny_imagenet.safetensors',
                                      'resnet_tiny_imagenet.safetensors.json']


def test_offline_the_error_names_the_file_to_place_and_the_url(weights_env, tmp_path,
                                                              monkeypatch):
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, closed_port_url())
  with pytest.raises(imagenet.DownloadError) as err:
    imagenet.fetch(BACKBONE, progress=False)
  message = str(err.value)
  assert str(tmp_path / 'cache' / 'resnet_tiny_imagenet.safetensors') in message
  assert f'/test/resnet_tiny.tv_in1k/resolve/{REVISION}/model.safetensors' in message
  assert 'init_weights=none' in message and imagenet.CACHE_ENV in message
  assert cache_contents(tmp_path) == []


def test_tensors_are_checked_against_the_backbone(weights_env, tmp_path, monkeypatch):
  state = tiny_state_dict()
  del state['layer4.0.bn3.running_var']
  state['layer1.0.conv1.weight'] = np.zeros((8, 16, 1, 1), np.float32)
  data = to_bytes(state)
  path = tmp_path / 'cache' / 'resnet_tiny_imagenet.safetensors'
  path.parent.mkdir()
  path.write_bytes(data)
  # The right checksum, the wrong tensors.
  monkeypatch.setitem(imagenet.SOURCES, BACKBONE, source_for(data))
  with pytest.raises(imagenet.ChecksumError) as err:
    imagenet.fetch(BACKBONE, progress=False)
  assert 'missing tensor layer4.0.bn3.running_var' in str(err.value)
  assert ('tensor layer1.0.conv1.weight has shape (8, 16, 1, 1), the resnet_tiny trunk needs '
          '(8, 8, 1, 1)') in str(err.value)


def test_backbones_without_weights_are_refused_before_any_download():
  with pytest.raises(ValueError, match="backbone='resnet_tiny'; they exist for resnet101, "
                                       'resnet50'):
    imagenet.fetch(BACKBONE, directory='/nonexistent')


def test_an_unpinned_source_reads_main_and_records_what_it_got(tmp_path):
  data = to_bytes(tiny_state_dict())
  source = source_for(data, revision=None, sha256=None)
  hub = FakeHub(source, data)
  sources = {BACKBONE: source}
  try:
    path = imagenet.fetch(BACKBONE, sources=sources, progress=False,
                          directory=tmp_path / 'cache', endpoint=hub.url)
  finally:
    hub.stop()
  assert hub.requests[0] == 'HEAD /test/resnet_tiny.tv_in1k/resolve/main/model.safetensors'
  sha = hashlib.sha256(data).hexdigest()
  assert json.loads(imagenet.record_file(path).read_text())['revision'] == REVISION
  # Later runs check the file against the recorded sha256, without the Hub.
  imagenet._VERIFIED.clear()
  assert imagenet.verify(path, BACKBONE, sources) == sha
  with open(path, 'r+b') as f:
    f.seek(-3, io.SEEK_END)
    f.write(b'xyz')
  imagenet._VERIFIED.clear()
  with pytest.raises(imagenet.ChecksumError, match='as recorded in'):
    imagenet.verify(path, BACKBONE, sources)


def test_scratch_and_paths_resolve_without_the_network(tmp_path):
  for value in ('none', '', None):
    assert imagenet.resolve(value, 'resnet101').path is None
  assert imagenet.resolve('/w/x.safetensors', None).path == '/w/x.safetensors'
  with pytest.raises(FileNotFoundError, match='no such file or directory'):
    imagenet.prepare(str(tmp_path / 'missing.safetensors'), 'resnet101')


@pytest.mark.parametrize('process', [0, 1])
def test_process_0_fetches_before_the_others_check_the_same_pin(monkeypatch, process):
  events = []
  monkeypatch.setattr(jax, 'process_index', lambda: process)
  monkeypatch.setattr(parallel, 'sync', lambda name: events.append('barrier'))
  monkeypatch.setattr(imagenet, 'resolve', lambda value, backbone, progress: events.append(
      ('resolve', value, progress)) or imagenet.InitialWeights('path', 'weights'))
  imagenet.prepare(names.IMAGENET, 'resnet101')
  first, barrier = (names.IMAGENET, True), 'barrier'
  assert events == ([('resolve', *first), barrier] if process == 0 else
                    [barrier, ('resolve', names.IMAGENET, False)])


def test_training_says_which_weights_before_the_data_and_skips_started_stages(
    weights_env, tmp_path, monkeypatch):
  config = toy.get_config('method=supervised,pretrain=within')
  config.unlock()
  config.init_weights, config.model.backbone = names.IMAGENET, BACKBONE
  plan = stages.plan(config)
  lines = io.StringIO()
  console = console_lib.Console(1, stream=lines)
  workdir = epath.Path(tmp_path / 'run')
  # The pretraining stage has begun: only the finetune stage is left, and it starts from it.
  (workdir / 'pretrain' / 'checkpoints' / '5').mkdir(parents=True)
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, closed_port_url())
  train._initial_weights(config, plan, workdir, console)
  assert lines.getvalue() == ''
  (workdir / 'pretrain' / 'checkpoints' / '5').rmdir()
  with pytest.raises(imagenet.DownloadError):  # Offline: before any data or compilation.
    train._initial_weights(config, plan, workdir, console)
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, weights_env[1].url)
  train._initial_weights(config, plan, workdir, console)
  assert lines.getvalue().startswith('Initial weights: Test ResNet-tiny from ')


class TinyNet(nn.Module):
  """Any network: create_train_state's wiring is checked, the loading is convert's."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(2, (1, 1))(x), x


def train_config(**changes) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      num_train_steps=10, ema_decay=0.99, init_weights=names.IMAGENET,
      model=dict(backbone=BACKBONE),
      optimizer=dict(learning_rate=1e-3, momentum=0.9, nesterov=True, weight_decay=0.0,
                     poly_power=0.9, min_learning_rate=0.0)))
  config.update(changes)
  return config


def test_create_train_state_loads_the_fetched_file_unless_told_not_to(weights_env, tmp_path,
                                                                     monkeypatch):
  seen = []
  monkeypatch.setattr(convert, 'load_initial_weights',
                      lambda path, variables: seen.append(path) or variables)
  state_lib.create_train_state(train_config(), TinyNet(), jax.random.key(0), (4, 4, 3))
  assert seen == [str(tmp_path / 'cache' / 'resnet_tiny_imagenet.safetensors')]
  # A restore target or a fine-tuning start neither fetches nor loads anything.
  monkeypatch.setenv(imagenet.CACHE_ENV, str(tmp_path / 'empty'))
  monkeypatch.setenv(imagenet.ENDPOINT_ENV, closed_port_url())
  state_lib.create_train_state(train_config(), TinyNet(), jax.random.key(0), (4, 4, 3),
                               initial_weights=False)
  assert len(seen) == 1 and not (tmp_path / 'empty').exists()


def test_loaded_weights_give_torchvisions_backbone_outputs(tmp_path, monkeypatch):
  """A torchvision-layout ResNet's state dict, fetched as `imagenet` weights and loaded as in
  training, gives the same trunk features in Flax as the PyTorch module."""
  tc = pytest.importorskip('test_convert')  # Its PyTorch ResNet (needs torch).
  torch = tc.torch
  torch.manual_seed(0)
  tv = tc.randomise(tc.TorchResNet(resnet.BACKBONES[BACKBONE]), 4).eval()
  data = to_bytes({k: v.detach().numpy() for k, v in tv.state_dict().items()})
  source = source_for(data)
  hub = FakeHub(source, data)
  try:
    weights = imagenet.resolve(names.IMAGENET, BACKBONE, sources={BACKBONE: source},
                               directory=tmp_path / 'cache', endpoint=hub.url, progress=False)
  finally:
    hub.stop()
  trunk = resnet.ResNet(BACKBONE, output_stride=32)
  x = np.random.default_rng(0).normal(size=(2, 3, 70, 54)).astype(np.float32)
  shapes = jax.eval_shape(functools.partial(trunk.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  # The trunk under 'backbone', as in a DeepLab; the file covers every one of its leaves.
  loaded = convert.load_initial_weights(weights.path, {c: {'backbone': shapes[c]}
                                                       for c in convert.COLLECTIONS})
  with torch.no_grad():
    holder = torch.nn.Module()
    tc._take_resnet(holder, tv)
    t_low, t_high = tc._run_resnet(holder, torch.from_numpy(x))
  with jax.default_matmul_precision('float32'):
    features = jax.jit(functools.partial(trunk.apply, train=False))(
        {c: loaded[c]['backbone'] for c in convert.COLLECTIONS},
        jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert features['layer4'].shape == tc.nchw_to_nhwc(t_high).shape
  assert tc.rel_err(features['layer1'], tc.nchw_to_nhwc(t_low)) < 1e-5
  assert tc.rel_err(features['layer4'], tc.nchw_to_nhwc(t_high)) < 1e-5
