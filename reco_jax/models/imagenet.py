"""ImageNet initial weights: torchvision's IMAGENET1K_V1 ResNets, fetched once and pinned.

`config.init_weights = 'imagenet'` starts the backbone of config.model.backbone (resnet50 or
resnet101) from torchvision's IMAGENET1K_V1 weights, what `resnet101(pretrained=True)` gives
the reference code (lorenmt/reco); the heads keep their random initialisation. The weights
come as safetensors under torchvision's tensor names (so no PyTorch is needed) from the
Hugging Face Hub repos `timm/resnet50.tv_in1k` and `timm/resnet101.tv_in1k`, whose timm
ResNets keep torchvision's module names (their `fc.*` head is ignored when loading).

Each file is downloaded once, with a progress bar, into the cache folder $RECO_JAX_WEIGHTS
(default ~/.cache/reco_jax/weights) as `<backbone>_imagenet.safetensors`, beside a record of
where it came from (`<file>.json`: repo, commit, sha256). A download reads the file at a
pinned Hub commit and is written atomically (a temporary file in the same folder, renamed when
whole). Its bytes must have the sha256 the Hub reports for the file (the LFS `X-Linked-Etag`
of its `resolve` answer), which must be the pinned sha256. A `Source` without a pinned commit
(see SOURCES) reads the repo's `main` and records the commit and sha256 it got. Every file is
checked before use: its sha256 against the pinned or recorded one, then its tensor names and
shapes against the backbone. A cached file is used without any network access. On several
hosts, process 0 fetches first, the others after it, and every process must arrive at process
0's sha256 (`prepare`).

The Hub address is $HF_ENDPOINT (default https://huggingface.co), as for huggingface_hub, so
a mirror (or a test server) can stand in for it.
"""
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from reco_jax import names

CACHE_ENV = 'RECO_JAX_WEIGHTS'
DEFAULT_CACHE = '~/.cache/reco_jax/weights'
ENDPOINT_ENV = 'HF_ENDPOINT'
DEFAULT_ENDPOINT = 'https://huggingface.co'
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(OSError):
  """The weights could not be fetched: offline, an HTTP error or an interrupted transfer."""


class ChecksumError(ValueError):
  """A weights file is not the pinned one: its sha256, tensor names or shapes differ."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one backbone's ImageNet weights come from, pinned.

  repo_id / filename: the file on the Hub; revision: the commit it is read at; sha256: the
  file's sha256 (hex), as the Hub reports it. None for either: not pinned yet, the download
  reads `main` and records the commit and sha256 it got beside the file.
  """
  description: str
  repo_id: str
  revision: str | None
  sha256: str | None
  filename: str = 'model.safetensors'


# One line per pinned value. To (re)pin a file, read the two headers of
#   curl -sI https://huggingface.co/<repo_id>/resolve/main/model.safetensors
# X-Repo-Commit (revision) and X-Linked-Etag (sha256).
SOURCES = {
    'resnet50': Source(
        'ImageNet ResNet-50 (torchvision IMAGENET1K_V1)', 'timm/resnet50.tv_in1k',
        revision='aa6c2d36d56bc0209040c02b5a7b7d7bf11d57b8',
        sha256='5d061a3c593d795bfe682d9b152bafbcf550579873492def3515b46db1189888'),
    # Not pinned yet: read at `main`, its commit and sha256 recorded at the first download.
    'resnet101': Source(
        'ImageNet ResNet-101 (torchvision IMAGENET1K_V1)', 'timm/resnet101.tv_in1k',
        revision=None, sha256=None),
}
UNPINNED_REVISION = 'main'


@dataclasses.dataclass(frozen=True)
class InitialWeights:
  """What config.init_weights resolves to: a file or directory to load, or None (scratch)."""
  path: str | None
  description: str
  sha256: str | None = None


def cache_dir() -> pathlib.Path:
  """$RECO_JAX_WEIGHTS, or ~/.cache/reco_jax/weights."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def cache_file(backbone: str, directory: str | os.PathLike | None = None) -> pathlib.Path:
  """<directory, default cache_dir()>/<backbone>_imagenet.safetensors."""
  folder = pathlib.Path(directory).expanduser() if directory is not None else cache_dir()
  return folder / f'{backbone}_imagenet.safetensors'


def url(source: Source, endpoint: str | None = None) -> str:
  """The download address of `source` at its pinned revision ($HF_ENDPOINT by default)."""
  base = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip('/')
  revision = source.revision or UNPINNED_REVISION
  return f'{base}/{source.repo_id}/resolve/{revision}/{source.filename}'


def record_file(weights: pathlib.Path) -> pathlib.Path:
  """Where the origin of a cached weights file is recorded: `<file>.json`."""
  return weights.with_name(weights.name + '.json')


def _recorded_sha256(weights: pathlib.Path) -> str | None:
  try:
    return json.loads(record_file(weights).read_text())['sha256']
  except (FileNotFoundError, KeyError, ValueError):
    return None


def _write_json_atomically(path: pathlib.Path, value: dict) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.part', dir=path.parent)
  with os.fdopen(fd, 'w') as f:
    json.dump(value, f, indent=2)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def _source(backbone: str | None, sources: Mapping[str, Source]) -> Source:
  if backbone not in sources:
    raise ValueError(
        f"init_weights='{names.IMAGENET}' needs ImageNet weights for config.model.backbone="
        f'{backbone!r}; they exist for {", ".join(sorted(sources))}. Choose one of those, '
        f'set init_weights={names.SCRATCH} to train from scratch, or give a '
        'weights file (init_weights=PATH).')
  return sources[backbone]


# (path, size, mtime_ns, sha256) of the files already checked by this process.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def sha256_of(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def expected_tensors(backbone: str) -> dict[str, tuple[int, ...]]:
  """torchvision tensor name -> PyTorch shape, for the trunk of `backbone` (no `fc`)."""
  import functools  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from reco_jax.models import convert  # pylint: disable=g-import-not-at-top
  from reco_jax.models import resnet  # pylint: disable=g-import-not-at-top
  trunk = resnet.ResNet(backbone=backbone, output_stride=32)
  shapes = jax.eval_shape(functools.partial(trunk.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3), jnp.float32))
  variables = {c: {'backbone': shapes[c]} for c in convert.COLLECTIONS}
  out = {}
  for name, (collection, *path) in convert.torch_names(variables, torchvision=True).items():
    shape = tuple(flax.traverse_util.flatten_dict(variables[collection])[tuple(path)].shape)
    # Conv kernels are HWIO in Flax and OIHW in PyTorch.
    out[name] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
  return out


def check_tensors(path: str | os.PathLike, backbone: str) -> None:
  """Raises ChecksumError unless `path` holds exactly the tensors of `backbone`'s trunk.

  Reads the safetensors header only. `fc.*` (the ImageNet classifier) and BatchNorm
  `num_batches_tracked` counters are allowed beside them.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  want = expected_tensors(backbone)
  try:
    with safe_open(os.fspath(path), framework='numpy') as f:
      have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise ChecksumError(f'{path} is not a readable safetensors file ({e}); delete it and run '
                        'again.') from e
  extra = [k for k in have if k not in want and not k.startswith('fc.')
           and not k.endswith('num_batches_tracked')]
  problems = [f'missing tensor {k}' for k in want if k not in have]
  problems += [f'unknown tensor {k} {have[k]}' for k in extra]
  problems += [f'tensor {k} has shape {have[k]}, the {backbone} trunk needs {s}'
               for k, s in want.items() if k in have and have[k] != s]
  if problems:
    shown = '\n  '.join(problems[:10])
    raise ChecksumError(f'{path} does not hold torchvision {backbone} weights '
                        f'({len(problems)} problems):\n  {shown}\nDelete it and run again.')


def verify(path: str | os.PathLike, backbone: str,
           sources: Mapping[str, Source] = SOURCES) -> str:
  """Checks a weights file against the pin of `backbone`; returns its sha256.

  Raises ChecksumError naming the file (to delete) when its sha256 or tensors differ. A file
  already verified by this process, unchanged since, is not hashed again.
  """
  source = _source(backbone, sources)
  path = pathlib.Path(path)
  expected = source.sha256 or _recorded_sha256(path)
  stat = os.stat(path)
  key = (os.fspath(path), stat.st_size, stat.st_mtime_ns, expected)
  if key in _VERIFIED:
    return expected
  found = sha256_of(path)
  if expected is not None and found != expected:
    where = (f'{source.repo_id} at revision {source.revision}' if source.sha256 else
             f'as recorded in {record_file(path)} at its download')
    raise ChecksumError(
        f'{path} has sha256 {found}, but the {source.description} weights ({where}) have '
        f'{expected}: the file is corrupt or another one. Delete it (rm {path}) and run again '
        f'to download it anew, or place the file of {url(source)} there.')
  check_tensors(path, backbone)
  if expected is None:  # Placed by hand where no pin or record says what it must be.
    _write_json_atomically(record_file(path), {'repo_id': source.repo_id, 'revision': None,
                                               'sha256': found, 'placed_by_hand': True})
  _VERIFIED.add((os.fspath(path), stat.st_size, stat.st_mtime_ns, found))
  return found


def _offline_help(source: Source, dest: pathlib.Path, address: str) -> str:
  sha = f'; its sha256 must be {source.sha256}' if source.sha256 else ''
  return (f'Download\n  {address}\non a machine with internet access and place it as\n'
          f'  {dest}\n(the folder is ${CACHE_ENV}, default {DEFAULT_CACHE}{sha}), or train '
          f'from scratch with init_weights={names.SCRATCH}.')


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Hands a redirect back as an HTTPError, whose headers the Hub's metadata is read from."""

  def redirect_request(self, *args, **kwargs):
    return None


def _resolve_on_hub(address: str, source: Source) -> tuple[str, str, str | None]:
  """(address of the bytes, sha256 the Hub reports, commit it resolved) of a `resolve` URL.

  The Hub answers `resolve` for an LFS file with a redirect whose `X-Linked-Etag` is the
  file's sha256 and `X-Repo-Commit` the commit the revision names.
  """
  request = urllib.request.Request(address, method='HEAD', headers={'User-Agent': 'reco_jax'})
  try:
    response = urllib.request.build_opener(_NoRedirect).open(request, timeout=_TIMEOUT_S)
    headers, target = response.headers, address
    response.close()
  except urllib.error.HTTPError as e:
    if e.code not in (301, 302, 303, 307, 308):
      raise
    headers = e.headers
    target = urllib.parse.urljoin(address, headers.get('Location', ''))
  etag = (headers.get('X-Linked-Etag') or headers.get('ETag') or '').strip()
  sha = etag.removeprefix('W/').strip('"').lower()
  if len(sha) != 64 or any(c not in '0123456789abcdef' for c in sha):
    raise DownloadError(f'{address} reported no sha256 for the file (X-Linked-Etag {etag!r}); '
                        'it cannot be checked, so it is not downloaded.')
  if source.sha256 and sha != source.sha256:
    raise ChecksumError(f'The Hub reports sha256 {sha} for {address}, not the pinned '
                        f'{source.sha256}: the file is not the pinned one; nothing was '
                        'downloaded.')
  return target, sha, headers.get('X-Repo-Commit') or source.revision


def _download(address: str, dest: pathlib.Path, source: Source, progress: bool) -> None:
  """Fetches `address` into `dest` atomically; nothing is left at `dest` unless it is whole
  and has the sha256 the Hub reports (the pinned one); its origin is recorded beside it."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  target, expected, commit = _resolve_on_hub(address, source)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{dest.name}.', suffix='.part', dir=dest.parent)
  try:
    digest, received = hashlib.sha256(), 0
    request = urllib.request.Request(target, headers={'User-Agent': 'reco_jax'})
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(
        request, timeout=_TIMEOUT_S) as response:
      length = response.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else None
      with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=dest.name,
                disable=not progress) as bar:
        while chunk := response.read(_CHUNK):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
    if total is not None and received != total:
      raise DownloadError(f'The download of {address} stopped after {received} of {total} '
                          'bytes.')
    if digest.hexdigest() != expected:
      raise ChecksumError(
          f'The file downloaded from {address} has sha256 {digest.hexdigest()}, not the '
          f'{expected} the Hub reports (and pins); it was not kept. Run again; if this '
          f'persists, the mirror (${ENDPOINT_ENV}) serves another file.')
    os.chmod(tmp, 0o644)  # As any download; mkstemp makes it private.
    # The record first: a file without its record is verified against the pin alone.
    _write_json_atomically(record_file(dest), {'repo_id': source.repo_id, 'revision': commit,
                                               'sha256': expected})
    os.replace(tmp, dest)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def fetch(backbone: str, *, sources: Mapping[str, Source] = SOURCES,
          directory: str | os.PathLike | None = None, endpoint: str | None = None,
          progress: bool = True) -> pathlib.Path:
  """The verified ImageNet weights file of `backbone`, downloaded first when not cached.

  Args:
    backbone: a key of `sources` (config.model.backbone).
    sources: the pinned files (tests pass their own).
    directory: the cache folder (default `cache_dir()`).
    endpoint: the Hub address (default $HF_ENDPOINT, else https://huggingface.co).
    progress: show a progress bar while downloading.

  Returns:
    The cached file; a file already there is checked and used without network access.

  Raises:
    ValueError: no weights (or no pin) for `backbone`.
    DownloadError: the download failed; the message says which file to place where.
    ChecksumError: the cached or downloaded file is not the pinned one.
  """
  source = _source(backbone, sources)
  dest = cache_file(backbone, directory)
  if not dest.exists():
    address = url(source, endpoint)
    try:
      _download(address, dest, source, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = e
      if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        reason = e.reason  # The cause, e.g. a failed name lookup.
      raise DownloadError(f'Could not download the {source.description} weights '
                          f"(init_weights='{names.IMAGENET}'): {str(reason).rstrip('.')}.\n"
                          f'{_offline_help(source, dest, address)}') from e
  verify(dest, backbone, sources)
  return dest


def resolve(init_weights: str | None, backbone: str | None, **fetch_kwargs) -> InitialWeights:
  """What config.init_weights names, fetching ImageNet weights when needed.

  init_weights: 'imagenet', 'none' or '' (from scratch), or the path of a .safetensors /
    .pth / .pt file or of a directory written by `python -m reco_jax.models.convert`.
  backbone: config.model.backbone (read for 'imagenet' only).
  fetch_kwargs: passed to `fetch`.
  """
  value = (init_weights or '').strip()
  if value in names.SCRATCH_VALUES:
    return InitialWeights(None, 'none (the network starts from its random initialisation)')
  if value == names.IMAGENET:
    path = fetch(backbone, **fetch_kwargs)
    sources = fetch_kwargs.get('sources', SOURCES)
    sha = verify(path, backbone, sources)
    return InitialWeights(os.fspath(path), f'{sources[backbone].description} from {path}, '
                                           f'sha256 {sha}', sha)
  return InitialWeights(value, value)


def prepare(init_weights: str | None, backbone: str | None) -> InitialWeights:
  """`resolve` on every process of a run, process 0 first; a missing weights path is an error.

  Process 0 downloads the ImageNet weights (with a progress bar) while the others wait;
  then the others resolve them too: from the same file when the cache folder is shared, by
  their own download otherwise. Each process checks its file (pinned or recorded sha256),
  and then that it has process 0's sha256, so every host starts from the same weights. If
  process 0 fails, it raises here with the message; the
  others wait for it at the barrier until the run is torn down.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from reco_jax import parallel  # pylint: disable=g-import-not-at-top
  value = (init_weights or '').strip()
  if value not in (*names.SCRATCH_VALUES, names.IMAGENET) and not epath.Path(value).exists():
    raise FileNotFoundError(
        f'init_weights={value!r}: no such file or directory. Expected {names.IMAGENET!r}, '
        f'{names.SCRATCH!r} or the path of a .safetensors/.pth/.pt file or of a directory '
        'written by `python -m reco_jax.models.convert`.')
  if value != names.IMAGENET:
    return resolve(value, backbone)
  first = jax.process_index() == 0
  if first:
    weights = resolve(init_weights, backbone, progress=True)
  parallel.sync('reco_jax_initial_weights')
  if not first:
    weights = resolve(init_weights, backbone, progress=False)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    mine = np.frombuffer(bytes.fromhex(weights.sha256), np.uint8)
    first_sha = bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).hex()
    if first_sha != weights.sha256:
      raise ChecksumError(f'Process {jax.process_index()} has ImageNet weights with sha256 '
                          f'{weights.sha256}, process 0 has {first_sha}: every host must start '
                          'from the same file. Give all hosts the same cache folder '
                          f'(${CACHE_ENV}) or the same file (init_weights=PATH).')
  return weights
