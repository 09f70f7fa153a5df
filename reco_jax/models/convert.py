"""PyTorch checkpoints -> Flax variables, and converted checkpoints on disk.

Two kinds of PyTorch state dicts load:
- torchvision ResNet ImageNet weights (`conv1.weight`, `layer1.0.conv1.weight`, ...; `fc.*`
  ignored): they fill the backbone, the heads keep their initial values;
- full models of the reference code (`resnet_conv1.weight`, `ASPP.convs.0.0.weight`,
  `classifier.0.weight`, `classifier.conv2d_list.0.weight`, ...): they fill everything.
A `module.` prefix (DataParallel) is dropped. Every expected tensor must be present with the
right shape and no unknown tensor may remain, or nothing is loaded and the error names them.

Command line:
  python -m reco_jax.models.convert IN OUT --model deeplabv3p --num_classes 21 \
      [--backbone resnet101 --output_stride 16]
"""
import argparse
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

TORCH_SUFFIXES = ('.pth', '.pt')
SAFETENSORS_SUFFIX = '.safetensors'
COLLECTIONS = ('params', 'batch_stats')

# Flax head module path -> reference PyTorch module name. ASPP's pooling branch is
# `convs.4.1`/`convs.4.2` because `convs.4.0` is the (parameter-free) pooling layer.
_HEAD_NAMES = {
    'aspp/pool_conv': 'ASPP.convs.4.1',
    'aspp/pool_bn': 'ASPP.convs.4.2',
    'aspp/project_conv': 'ASPP.project.0',
    'aspp/project_bn': 'ASPP.project.1',
    'project_conv': 'project.0',
    'project_bn': 'project.1',
    'classifier_conv': 'classifier.0',
    'classifier_bn': 'classifier.1',
    'classifier_out': 'classifier.3',
    'representation_conv': 'representation.0',
    'representation_bn': 'representation.1',
    'representation_out': 'representation.3',
    'representation': 'representation.0',  # DeepLabV2's single 1x1 conv.
}
# (collection, Flax leaf name) -> PyTorch tensor name.
_LEAF_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
_TORCHVISION_IGNORED = ('fc.weight', 'fc.bias')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: missing, unknown or mis-shaped tensors."""


def _module_name(module_path: tuple[str, ...], torchvision: bool) -> str | None:
  """PyTorch module name of a Flax module path; None for heads of torchvision checkpoints."""
  if module_path[0] == 'backbone':
    prefix = '' if torchvision else 'resnet_'
    parts = []
    for part in module_path[1:]:
      layer = re.fullmatch(r'(layer\d)_(\d+)', part)
      if layer:
        parts.append(f'{layer.group(1)}.{layer.group(2)}')
      elif part == 'downsample_conv':
        parts.append('downsample.0')
      elif part == 'downsample_bn':
        parts.append('downsample.1')
      else:
        parts.append(part)
    return prefix + '.'.join(parts)
  if torchvision:
    return None
  key = '/'.join(module_path)
  if key in _HEAD_NAMES:
    return _HEAD_NAMES[key]
  branch = re.fullmatch(r'aspp/branch(\d)_(conv|bn)', key)
  if branch:
    return f'ASPP.convs.{branch.group(1)}.{0 if branch.group(2) == "conv" else 1}'
  v2_classifier = re.fullmatch(r'classifier_(\d)', key)
  if v2_classifier:
    return f'classifier.conv2d_list.{v2_classifier.group(1)}'
  raise ValueError(f'No PyTorch name is known for the Flax module {key!r}; '
                   'is this a DeepLabV3Plus or DeepLabV2 from reco_jax.models.deeplab?')


def torch_names(variables: Mapping[str, Any], torchvision: bool) -> dict[str, tuple[str, ...]]:
  """PyTorch tensor name -> Flax path (collection, module..., leaf) for `variables`.

  With `torchvision=True` only the backbone appears (torchvision ResNet names).
  """
  names = {}
  for collection in COLLECTIONS:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
    for path in flat:
      module = _module_name(path[:-1], torchvision)
      if module is None:
        continue
      leaf = _LEAF_NAMES.get((collection, path[-1]))
      if leaf is None:
        raise ValueError(f'No PyTorch name is known for {collection}/{"/".join(path)}.')
      names[f'{module}.{leaf}'] = (collection, *path)
  return names


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (.safetensors, .pth or .pt) as numpy arrays (floats as float32).

  `module.` prefixes and `num_batches_tracked` counters are dropped. Only .pth/.pt need torch.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file at {path!r}.')
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    raw = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
           for k, v in load_file(path).items()}
  elif path.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path!r} needs PyTorch (pip install torch); or convert it to '
                        '.safetensors elsewhere and load that without torch.') from e
    raw = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(raw, Mapping) and isinstance(raw.get('state_dict'), Mapping):
      raw = raw['state_dict']
    if not isinstance(raw, Mapping):
      raise ValueError(f'{path!r} holds a {type(raw).__name__}, not a state dict; save '
                       '`model.state_dict()`.')
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
      raise ValueError(f'{path!r} is not a flat state dict of tensors: {bad[:5]} are not '
                       'tensors; save `model.state_dict()`.')
    raw = {k: v.detach().to(torch.float32).numpy() if v.is_floating_point()
           else v.detach().numpy() for k, v in raw.items()}
  else:
    raise ValueError(f'Unsupported checkpoint file {path!r}: expected {SAFETENSORS_SUFFIX} or '
                     f'{"/".join(TORCH_SUFFIXES)}.')
  return _normalise(raw)


def _normalise(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  # DataParallel prefixes every name with `module.`; the BatchNorm step counters have no
  # Flax counterpart.
  out = {}
  for key, value in state.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if not key.endswith('num_batches_tracked'):
      out[key] = np.asarray(value)
  return out


def is_reference_checkpoint(state: Mapping[str, Any]) -> bool:
  """True for a full reference DeepLab state dict, False for a torchvision ResNet one."""
  return any(k.startswith('resnet_') for k in state)


def _to_flax(value: np.ndarray) -> np.ndarray:
  # Conv weights are OIHW in PyTorch and HWIO in Flax.
  return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value


def _raise_problems(problems: list[str], what: str) -> None:
  if problems:
    shown = '\n  '.join(problems[:30])
    more = f'\n  ... and {len(problems) - 30} more' if len(problems) > 30 else ''
    raise CheckpointMismatchError(f'{what} does not fit the model ({len(problems)} problems):'
                                  f'\n  {shown}{more}')


def state_dict_to_variables(state: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                            source: str = 'checkpoint') -> dict:
  """Fills `variables` ({'params', 'batch_stats'} of a reco_jax DeepLab) from a state dict.

  `state` maps PyTorch names to numpy arrays (`module.` prefixes and `num_batches_tracked`
  are dropped here too). Returns a new dict; `variables` is not modified. Leaves the state dict does not cover
  (the heads, for a torchvision checkpoint) are kept. `variables` may be abstract
  (jax.eval_shape) when the state dict covers every leaf (a full reference checkpoint).
  Raises CheckpointMismatchError naming every missing, unknown or mis-shaped tensor.
  """
  state = _normalise(state)
  torchvision = not is_reference_checkpoint(state)
  names = torch_names(variables, torchvision)
  flat = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[c]))
          for c in COLLECTIONS if c in variables}
  ignored = set(_TORCHVISION_IGNORED) if torchvision else set()
  problems = [f'missing tensor {n}' for n in names if n not in state]
  problems += [f'unknown tensor {n} {tuple(state[n].shape)}' for n in state
               if n not in names and n not in ignored]
  converted = {}
  for name, (collection, *path) in names.items():
    if name not in state:
      continue
    target = flat[collection][tuple(path)]
    value = _to_flax(state[name])
    if value.shape != tuple(target.shape):
      problems.append(f'tensor {name} has shape {tuple(state[name].shape)} but the model needs '
                      f'{_torch_shape(target.shape)} (for {collection}/{"/".join(path)})')
      continue
    converted[(collection, tuple(path))] = jnp.asarray(value, dtype=target.dtype)
  kind = 'torchvision ResNet' if torchvision else 'reference DeepLab'
  _raise_problems(problems, f'{source} (read as a {kind} state dict)')
  for (collection, path), value in converted.items():
    flat[collection][path] = value
  unset = [f'{c}/{"/".join(p)}' for c, leaves in flat.items() for p, v in leaves.items()
           if isinstance(v, jax.ShapeDtypeStruct)]
  if unset:
    raise ValueError(f'{source} does not cover {len(unset)} entries (e.g. {unset[0]}) and '
                     'the given variables are abstract; pass initialised variables '
                     '(`model.init`) so that those keep their initial values.')
  out = dict(variables)
  for collection, leaves in flat.items():
    out[collection] = flax.traverse_util.unflatten_dict(leaves)
  return out


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  shape = tuple(shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def load_torch_weights(path: str, variables: Mapping[str, Any]) -> dict:
  """Loads a torchvision ResNet or a reference DeepLab checkpoint into `variables`.

  Args:
    path: .safetensors (read without torch), .pth or .pt state dict.
    variables: {'params', 'batch_stats'} of a DeepLabV3Plus / DeepLabV2 (from `init`; or
      from `jax.eval_shape(model.init, ...)` for a full reference checkpoint).

  Returns:
    New variables with the checkpoint's tensors; for torchvision checkpoints only the
    backbone changes. Raises CheckpointMismatchError naming missing, unknown or mis-shaped
    tensors, before anything is loaded.
  """
  return state_dict_to_variables(read_state_dict(path), variables, source=repr(path))


def _local(path: str) -> epath.Path:
  # Orbax needs absolute paths; remote paths (gs://...) already are.
  path = os.fspath(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def save_converted(path: str, variables: Mapping[str, Any]) -> None:
  """Writes {'params', 'batch_stats'} of `variables` as an orbax checkpoint directory.

  Orbax writes into a temporary directory and renames it when complete, so an error leaves
  no partial `path`. Raises FileExistsError if `path` exists.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = _local(path)
  if directory.exists():
    raise FileExistsError(f'{path!r} already exists; remove it or choose another output path.')
  tree = {c: variables[c] for c in COLLECTIONS if c in variables}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, tree)
  checkpointer.wait_until_finished()


def load_converted(path: str, variables: Mapping[str, Any]) -> dict:
  """Restores a directory written by `save_converted` into the structure of `variables`.

  `variables` gives the expected tree, shapes and dtypes (concrete arrays or
  jax.ShapeDtypeStruct). Raises CheckpointMismatchError naming every missing, unexpected or
  mis-shaped entry.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = _local(path)
  if not directory.is_dir():
    raise FileNotFoundError(f'No converted checkpoint directory at {path!r}.')
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(directory).item_metadata.tree
  target = {c: variables[c] for c in COLLECTIONS if c in variables}
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(target), sep='/')
  have = flax.traverse_util.flatten_dict(dict(stored), sep='/')
  problems = [f'missing {k} {tuple(v.shape)}' for k, v in want.items() if k not in have]
  problems += [f'unexpected {k} {tuple(v.shape)}' for k, v in have.items() if k not in want]
  problems += [f'{k} has shape {tuple(have[k].shape)} but the model needs {tuple(v.shape)}'
               for k, v in want.items() if k in have and tuple(have[k].shape) != tuple(v.shape)]
  _raise_problems(problems, f'converted checkpoint {path!r}')
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None) or default), target)
  restored = checkpointer.restore(directory, abstract)
  out = dict(variables)
  out.update(restored)
  return out


def load_initial_weights(path: str, variables: Mapping[str, Any]) -> dict:
  """Loads `config.init_weights`: a .safetensors/.pth/.pt state dict or a converted directory."""
  path = os.fspath(path)
  if path.endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)):
    return load_torch_weights(path, variables)
  if _local(path).is_dir():
    return load_converted(path, variables)
  raise ValueError(f'init_weights {path!r} is neither a {SAFETENSORS_SUFFIX}/.pth/.pt file nor '
                   'a directory written by `python -m reco_jax.models.convert`.')


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m reco_jax.models.convert',
      description='Convert a torchvision ResNet or reference DeepLab checkpoint into an orbax '
                  'directory of Flax variables.')
  parser.add_argument('input', help='.safetensors, .pth or .pt state dict')
  parser.add_argument('output', help='directory to create')
  parser.add_argument('--model', default='deeplabv3p', choices=('deeplabv3p', 'deeplabv2'))
  parser.add_argument('--num_classes', type=int, required=True)
  parser.add_argument('--backbone', default='resnet101',
                      help='resnet50, resnet101 or resnet_tiny')
  parser.add_argument('--rep_dim', type=int, default=256)
  parser.add_argument('--seed', type=int, default=0,
                      help='initialises the heads a torchvision checkpoint does not cover')
  # DeepLabV3+ only; left unset they keep the model's defaults.
  for flag in ('output_stride', 'aspp_dim', 'low_level_dim', 'head_dim'):
    parser.add_argument(f'--{flag}', type=int, default=None, help='DeepLabV3+ only')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  from reco_jax.models import deeplab  # pylint: disable=g-import-not-at-top
  args = _parse_args(argv)
  kwargs = dict(num_classes=args.num_classes, backbone=args.backbone, rep_dim=args.rep_dim)
  for flag in ('output_stride', 'aspp_dim', 'low_level_dim', 'head_dim'):
    if getattr(args, flag) is not None:
      if args.model != 'deeplabv3p':
        raise SystemExit(f'--{flag} applies to deeplabv3p only, not {args.model}.')
      kwargs[flag] = getattr(args, flag)
  model = deeplab.build_model(args.model, **kwargs)
  state = read_state_dict(args.input)
  init = functools.partial(model.init, jax.random.key(args.seed),
                           jnp.zeros((1, 65, 65, 3), jnp.float32), train=False)
  if is_reference_checkpoint(state):
    # A full checkpoint replaces every value: the shapes suffice, no initialisation needed.
    variables = jax.eval_shape(init)
  else:
    variables = jax.jit(init)()
  variables = state_dict_to_variables(state, variables, source=repr(args.input))
  save_converted(args.output, variables)
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(f'Wrote {args.output} ({args.model}, {count:,} parameters).')


if __name__ == '__main__':
  main()
