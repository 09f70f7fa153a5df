"""ReCo loss cost: jitted forward + backward time and XLA temporary memory.

Scales (semi-supervised, labelled + unlabelled batch at 1/4 of a 321x321 crop):
  voc: rep 20x81x81x256, 21 classes; sun: the same with 37 classes. 256 queries, 512 negatives.

  python -m benchmarks.reco_loss                  # both scales, exact per-query negatives
  python -m benchmarks.reco_loss --shared         # also the shared-negatives mode
  python -m benchmarks.reco_loss --dtype=bfloat16 # bf16 representations (model in bf16)
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.losses import reco

SCALES = {'voc': 21, 'sun': 37}


def make_inputs(num_classes, batch=20, size=81, dim=256, dtype='float32', seed=0):
  """Random batch in which every class is present and most pixels are hard queries."""
  rng = np.random.default_rng(seed)
  rep = rng.normal(size=(batch, size, size, dim)).astype(np.float32)
  # Class regions of 9x9 pixels, so classes are spatially grouped as in real label maps.
  coarse = rng.integers(0, num_classes, size=(batch, size // 9 + 1, size // 9 + 1))
  labels = np.repeat(np.repeat(coarse, 9, 1), 9, 2)[:, :size, :size].astype(np.int32)
  labels.reshape(-1)[:num_classes] = np.arange(num_classes)  # every class present
  valid = rng.random((batch, size, size)) > 0.1
  logits = rng.normal(size=(batch, size, size, num_classes)).astype(np.float32)
  prob = np.asarray(jax.nn.softmax(logits + 2.0 * np.eye(num_classes)[labels], -1))
  return jnp.asarray(rep, dtype), jnp.asarray(labels), jnp.asarray(valid), jnp.asarray(prob)


def measure(num_classes, runs, dtype, **loss_kwargs):
  """Forward+backward seconds after warm-up: median and min wall, median process CPU; temp bytes.

  CPU time (all threads) is reported because the wall time on a shared machine mostly
  measures the other jobs.
  """
  inputs = make_inputs(num_classes, dtype=dtype)
  key = jax.random.key(0)
  fn = jax.jit(jax.value_and_grad(
      lambda rep, key, labels, valid, prob: reco.reco_loss(key, rep, labels, valid, prob,
                                                           **loss_kwargs)))
  compiled = fn.lower(inputs[0], key, *inputs[1:]).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(inputs[0], key, *inputs[1:]))  # warm-up
  times, cpu = [], []
  for i in range(runs):
    step_key = jax.random.fold_in(key, i)
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(inputs[0], step_key, *inputs[1:]))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(times), min(times), statistics.median(cpu), temp


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scales', default='voc,sun')
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--shared', action='store_true', help='also time shared_negatives=True')
  parser.add_argument('--block_rows', type=int, default=None)
  args = parser.parse_args()
  modes = [False, True] if args.shared else [False]
  extra = {} if args.block_rows is None else {'block_rows': args.block_rows}
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, rep dtype {args.dtype}')
  print('scale  classes  negatives  median_s  min_s  cpu_s  temp_MiB')
  for scale in args.scales.split(','):
    for shared in modes:
      median, best, cpu, temp = measure(SCALES[scale], args.runs, args.dtype,
                                        shared_negatives=shared, **extra)
      print(f'{scale:5}  {SCALES[scale]:7}  {"shared" if shared else "per-query":9}  '
            f'{median:8.3f}  {best:5.3f}  {cpu:5.3f}  {temp / 2**20:8.1f}', flush=True)


if __name__ == '__main__':
  main()
