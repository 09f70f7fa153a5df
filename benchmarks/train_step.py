"""Cost of ReCo inside the training step at the paper's VOC configuration.

DeepLabV3+ ResNet-101, 21 classes, 321x321 crops, Mean Teacher + ClassMix:
1. XLA temporary memory of the compiled step (compile only, `memory_analysis()`) at the
   paper's batch (10 labelled + 10 unlabelled), with and without ReCo;
2. seconds per step, with and without ReCo, at a smaller batch (2 + 2 by default) that runs
   in reasonable time on a CPU;
3. seconds per supervised step (batch 2), with and without ReCo, beside the reference PyTorch
   figures (3.8 s and 40.4 s on 2 CPU threads).
Ends with `reco_time_ratio=X reco_memory_ratio=Y` (with ReCo / without, semi-supervised).
`--precision=bf16` runs every part with bfloat16 convolutions and matmuls (config
precision=bf16); `--compare_precision` prints only the compile-only temporary memory and XLA
FLOPs of the ClassMix + ReCo step at the memory batch in float32 and in bfloat16.
`--explain` prints only the compile-only decomposition of the overhead at the memory batch
(temporary memory and XLA FLOPs with stand-in losses in place of ReCo; see benchmarks/README.md).
`--compare_unimatch` prints only UniMatch's step beside ClassMix + ReCo's: temporary memory and
XLA FLOPs at the memory batch (compile only; UniMatch reads 2 x batch unlabelled images, u and
its CutMix source u'), then seconds per step at the time batch.

Inputs are random, so the teacher is untrained: every unlabelled pixel is made valid for ReCo
(weak threshold 0) and every pixel is a hard query, the most expensive case for the loss.

  PYTHONPATH=. python benchmarks/train_step.py
  PYTHONPATH=. python benchmarks/train_step.py --backbone=resnet_tiny --size=65  # smoke run
  PYTHONPATH=. python benchmarks/train_step.py --explain --memory_batch=2
  PYTHONPATH=. python benchmarks/train_step.py --recompute_labelled  # the memory-saving mode
  PYTHONPATH=. python benchmarks/train_step.py --compare_precision  # float32 vs bfloat16 memory
  PYTHONPATH=. python benchmarks/train_step.py --compare_unimatch  # UniMatch beside ClassMix
  PYTHONPATH=. python benchmarks/train_step.py --bank=2048 --backbone=resnet_tiny
      # only: seconds per ClassMix + ReCo step, batch-mode ReCo beside a feature bank of 2048
      # keys per class (config.reco_bank_size), at --time_batch
"""
import argparse
import functools
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from configs import voc
from reco_jax import methods
from reco_jax import names
from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax.losses import reco as reco_lib
from reco_jax.models import deeplab


def make_config(method: str, reco: bool, batch: int, size: int, recompute: bool = False,
                bank: int = 0, precision: str = 'fp32'):
  # Step times do not depend on the weights.
  config = voc.get_config(f'init_weights=none,precision={precision}')
  config.method = method
  config.reco = reco
  config.recompute_labelled = recompute
  config.reco_bank_size = bank
  config.batch_size = batch
  config.crop_size = (size, size)
  config.weak_threshold = 0.0
  return config


def _halves(rep):
  # One device: per_device_concat put the labelled representations first.
  n = rep.shape[0] // 2
  return rep[:n], rep[n:]


def _separable_loss(key, rep, *args, **kwargs):
  """Keeps the representation head and its backward pass; the two passes stay independent."""
  del key, args, kwargs
  return jnp.mean(rep)


def _coupled_loss(key, rep, *args, **kwargs):
  """As cheap as `_separable_loss`, but each pass's gradient depends on the other pass."""
  del key, args, kwargs
  l_rep, u_rep = _halves(rep)
  sg = jax.lax.stop_gradient
  return jnp.mean(l_rep) * sg(jnp.mean(u_rep)) + jnp.mean(u_rep) * sg(jnp.mean(l_rep))


def _stopped_reco_loss(key, rep, *args, **kwargs):
  """The real ReCo loss with no gradient into the network."""
  return _REAL_RECO(key, jax.lax.stop_gradient(rep), *args, **kwargs)


_REAL_RECO = reco_lib.reco_loss_per_device
# name -> (config.reco, stand-in for reco_loss_per_device or None for the real loss)
STAND_INS = {
    'no ReCo': (False, None),
    'ReCo': (True, None),
    'ReCo, no gradient to the network': (True, _stopped_reco_loss),
    'rep head + separable mean loss': (True, _separable_loss),
    'rep head + coupling mean loss': (True, _coupled_loss),
}


def random_batch(rng, batch, size, num_classes, method):
  """Normalised images and labels with a few classes per image in blocks, some void.

  The branches are `method`'s (its BRANCHES in multiples of batch).
  """
  def labelled(n):
    blocks = rng.integers(0, num_classes, (n, 4, 4))
    # Each image keeps three of its block classes, as VOC images hold few classes.
    keep = blocks[:, :1, :3].reshape(n, 3)
    blocks = np.take_along_axis(keep, rng.integers(0, 3, (n, 16)), 1).reshape(n, 4, 4)
    reps = -(-size // 4)
    labels = np.repeat(np.repeat(blocks, reps, 1), reps, 2)[:, :size, :size].astype(np.int32)
    labels[:, :, :size // 20] = 255
    return labels

  labelled_n, unlabelled_n = (b * batch for b in methods.get(method).branches)
  labelled_n = batch if method == 'supervised' else labelled_n  # `--time_batch` images
  out = {'labelled': {'image': rng.normal(size=(labelled_n, size, size, 3)).astype(np.float32),
                      'label': labelled(labelled_n)}}
  if unlabelled_n:
    out['unlabelled'] = {
        'image': rng.normal(size=(unlabelled_n, size, size, 3)).astype(np.float32)}
  return out


def abstract_state(config, model, size):
  """The train state as shapes only (enough to compile)."""
  dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             dummy)
  schedule = state_lib.learning_rate_schedule(config)
  tx = state_lib.make_optimizer(config, schedule)
  return state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'], opt_state=jax.eval_shape(tx.init,
                                                                     variables['params']),
      ema_params=variables['params'], ema_batch_stats=variables['batch_stats'],
      apply_fn=model.apply, tx=tx, learning_rate_fn=schedule)


def abstract_batch(batch, mesh):
  sharding = parallel.data_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      batch)


def temp_memory(config, model, mesh, size, rng, loss=None):
  """(temporary bytes, XLA FLOPs, compile seconds) of the jitted step, compiled only.

  loss: optional stand-in for `reco_loss_per_device` (same signature).
  """
  batch = random_batch(rng, config.batch_size, size, config.num_classes, config.method)
  with mock.patch.object(reco_lib, 'reco_loss_per_device', loss or _REAL_RECO):
    step = steps.make_train_step(config, model, mesh)
    start = time.perf_counter()
    compiled = step.lower(abstract_state(config, model, size), abstract_batch(batch, mesh),
                          jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (compiled.memory_analysis().temp_size_in_bytes, cost['flops'],
          time.perf_counter() - start)


def seconds_per_step(config, model, mesh, state, size, rng, num_steps):
  """(mean wall s, mean process CPU s per step after one warm-up step, compile s, last loss)."""
  batch = parallel.shard_batch(mesh, random_batch(rng, config.batch_size, size,
                                                  config.num_classes, config.method))
  key = jax.random.key(0)
  state = jax.tree.map(jnp.copy, state)
  start = time.perf_counter()
  step = steps.make_train_step(config, model, mesh).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_steps):
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
  return ((time.perf_counter() - start) / num_steps,
          (time.process_time() - cpu_start) / num_steps, compile_s, float(metrics['loss']))


def make_model(backbone: str, precision: str):
  """The VOC DeepLabV3+ (21 classes, output stride 16) in the compute dtype of `precision`."""
  return deeplab.build_model('deeplabv3p', num_classes=21, backbone=backbone, output_stride=16,
                             rep_dim=256, dtype=names.PRECISIONS[precision])


def compare_precision(args, mesh, rng):
  """Compile-only temporary memory of the ClassMix + ReCo step, float32 beside bfloat16."""
  shape = f'{args.memory_batch}+{args.memory_batch}'
  memory = {}
  for precision in names.PRECISIONS:
    config = make_config('classmix', True, args.memory_batch, args.size,
                         args.recompute_labelled, precision=precision)
    model = make_model(args.backbone, precision)
    memory[precision], flops, compile_s = temp_memory(config, model, mesh, args.size, rng)
    print(f'classmix {shape} reco=True precision={precision}: temp memory '
          f'{memory[precision] / 2**30:.2f} GiB, {flops / 1e9:.1f} GFLOP '
          f'(compile {compile_s:.0f} s)', flush=True)
  print(f'load average {os.getloadavg()}')
  print(f'bf16_memory_ratio={memory["bf16"] / memory["fp32"]:.3f}')


def compare_unimatch(args, model, mesh, rng):
  """UniMatch's step (with and without ReCo) beside ClassMix + ReCo's: memory, FLOPs, time."""
  cases = (('classmix', True), ('unimatch', False), ('unimatch', True))
  costs = {}
  for method, reco in cases:
    config = make_config(method, reco, args.memory_batch, args.size, precision=args.precision)
    temp, flops, compile_s = temp_memory(config, model, mesh, args.size, rng)
    costs[method, reco] = temp, flops
    images = '+'.join(str(b * args.memory_batch) for b in methods.get(method).branches)
    print(f'{method} {images} reco={reco}: temp memory {temp / 2**30:.2f} GiB, '
          f'{flops / 1e9:.1f} GFLOP (compile {compile_s:.0f} s)', flush=True)
  state = state_lib.create_train_state(make_config('classmix', True, args.time_batch,
                                                   args.size), model, jax.random.key(0),
                                       (args.size, args.size, 3), mesh=mesh)
  timing = {}
  for method, reco in cases:
    config = make_config(method, reco, args.time_batch, args.size, precision=args.precision)
    start = state.replace(tx=state_lib.make_optimizer(config),
                          opt_state=state_lib.make_optimizer(config).init(state.params))
    secs, cpu, compile_s, loss = seconds_per_step(config, model, mesh, start, args.size, rng,
                                                  args.steps)
    timing[method, reco] = secs
    images = '+'.join(str(b * args.time_batch) for b in methods.get(method).branches)
    print(f'{method} {images} reco={reco}: {secs:.3f} s/step, CPU {cpu:.3f} s/step '
          f'(compile {compile_s:.0f} s, loss {loss:.3f})', flush=True)
  print(f'load average {os.getloadavg()}')
  base = ('classmix', True)
  for case in cases[1:]:
    print(f'{case[0]} reco={case[1]} / classmix reco=True: '
          f'memory_ratio={costs[case][0] / costs[base][0]:.3f} '
          f'flops_ratio={costs[case][1] / costs[base][1]:.3f} '
          f'time_ratio={timing[case] / timing[base]:.3f}')


def time_bank(args, model, mesh, rng):
  """Seconds per ClassMix + ReCo step at --time_batch: batch-mode ReCo, then with the bank."""
  batch, size = args.time_batch, args.size
  bank_config = make_config('classmix', True, batch, size, args.recompute_labelled, args.bank,
                            args.precision)
  state = state_lib.create_train_state(bank_config, model, jax.random.key(0), (size, size, 3),
                                       mesh=mesh)
  timing = {}
  for bank in (0, args.bank):
    config = make_config('classmix', True, batch, size, args.recompute_labelled, bank,
                         args.precision)
    start = state if bank else state.replace(extras={})
    secs, cpu, compile_s, loss = seconds_per_step(config, model, mesh, start, size, rng,
                                                  args.steps)
    timing[bank] = secs
    print(f'classmix {batch}+{batch} reco=True reco_bank_size={bank}: {secs:.3f} s/step, '
          f'CPU {cpu:.3f} s/step (compile {compile_s:.0f} s, loss {loss:.3f})', flush=True)
  print(f'load average {os.getloadavg()}')
  print(f'bank_time_ratio={timing[args.bank] / timing[0]:.3f} '
        f'bank_extra_s={timing[args.bank] - timing[0]:.3f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='resnet101')
  parser.add_argument('--size', type=int, default=321)
  parser.add_argument('--memory_batch', type=int, default=10)
  parser.add_argument('--time_batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--explain', action='store_true')
  parser.add_argument('--recompute_labelled', action='store_true',
                      help='semi-supervised steps with config.recompute_labelled=True')
  parser.add_argument('--precision', default='fp32', choices=tuple(names.PRECISIONS),
                      help='compute dtype of the convolutions and matmuls (config precision)')
  parser.add_argument('--compare_precision', action='store_true',
                      help='only the temporary memory of the ClassMix + ReCo step at the '
                           'memory batch, in float32 and in bfloat16 (compile only)')
  parser.add_argument('--compare_unimatch', action='store_true',
                      help='only UniMatch (with and without ReCo) beside ClassMix + ReCo: '
                           'memory and FLOPs at the memory batch, time at the time batch')
  parser.add_argument('--bank', type=int, default=0,
                      help='only time ClassMix + ReCo steps without and with a feature bank '
                           'of this many keys per class')
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), '
        f'load average {os.getloadavg()}', flush=True)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  model = make_model(args.backbone, args.precision)
  size = args.size
  shape = f'{args.memory_batch}+{args.memory_batch}'

  if args.compare_precision:
    compare_precision(args, mesh, rng)
    return

  if args.bank:
    time_bank(args, model, mesh, rng)
    return

  if args.compare_unimatch:
    compare_unimatch(args, model, mesh, rng)
    return

  if args.explain:
    base = None
    for name, (reco, loss) in STAND_INS.items():
      config = make_config('classmix', reco, args.memory_batch, size,
                           precision=args.precision)
      temp, flops, compile_s = temp_memory(config, model, mesh, size, rng, loss)
      base = base or (temp, flops)
      print(f'classmix {shape} {name}: temp memory {temp / 2**30:.3f} GiB '
            f'(x{temp / base[0]:.3f}), {flops / 1e9:.1f} GFLOP (x{flops / base[1]:.3f}) '
            f'(compile {compile_s:.0f} s)', flush=True)
    print(f'load average {os.getloadavg()}')
    return

  memory = {}
  for reco in (False, True):
    config = make_config('classmix', reco, args.memory_batch, size, args.recompute_labelled,
                         precision=args.precision)
    memory[reco], flops, compile_s = temp_memory(config, model, mesh, size, rng)
    print(f'classmix {shape} reco={reco}: temp memory '
          f'{memory[reco] / 2**30:.2f} GiB, {flops / 1e9:.1f} GFLOP (compile {compile_s:.0f} s)',
          flush=True)

  start = time.perf_counter()
  state = state_lib.create_train_state(make_config('classmix', False, 2, size,
                                                   precision=args.precision), model,
                                       jax.random.key(0), (size, size, 3), mesh=mesh)
  jax.block_until_ready(state)
  print(f'create_train_state: {time.perf_counter() - start:.0f} s', flush=True)

  timing = {}
  for method, batch in (('classmix', args.time_batch), ('supervised', 2)):
    for reco in (False, True):
      config = make_config(method, reco, batch, size, args.recompute_labelled,
                           precision=args.precision)
      secs, cpu, compile_s, loss = seconds_per_step(config, model, mesh, state, size, rng,
                                                    args.steps)
      timing[method, reco] = secs
      shape = f'{batch}+{batch}' if method != 'supervised' else f'{batch}'
      print(f'{method} {shape} reco={reco}: {secs:.2f} s/step, '
            f'CPU {cpu:.2f} s/step (compile {compile_s:.0f} s, loss {loss:.3f})', flush=True)
  print('reference PyTorch (lorenmt/reco, measured here on 2 CPU threads, batch 2): '
        'supervised 3.8 s/step, with ReCo 40.4 s/step')
  print(f'load average {os.getloadavg()}')
  print(f'reco_time_ratio={timing["classmix", True] / timing["classmix", False]:.3f} '
        f'reco_memory_ratio={memory[True] / memory[False]:.3f}')


if __name__ == '__main__':
  main()
