"""ReCo loss cost: jitted forward + backward time and XLA temporary memory.

Scales (semi-supervised, labelled + unlabelled batch at 1/4 of a 321x321 crop):
  voc: rep 20x81x81x256, 21 classes; sun: the same with 37 classes. 256 queries, 512 negatives.

  python -m benchmarks.reco_loss                  # both scales, exact per-query negatives
  python -m benchmarks.reco_loss --shared         # also the shared-negatives mode
  python -m benchmarks.reco_loss --dtype=bfloat16 # bf16 representations (model in bf16)
  python -m benchmarks.reco_loss --present=21,12  # batches holding 21 and 12 of the classes
  python -m benchmarks.reco_loss --floor          # also the time to merely gather the keys
  python -m benchmarks.reco_loss --bank=2048      # also with a full feature bank of 2048 keys
                                                  # per class (its update included)
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.losses import reco
from reco_jax.losses import reco_bank

SCALES = {'voc': 21, 'sun': 37}


def make_inputs(num_classes, batch=20, size=81, dim=256, dtype='float32', seed=0,
                present=None):
  """Random batch in which `present` classes (default all) occur and most pixels are hard."""
  rng = np.random.default_rng(seed)
  rep = rng.normal(size=(batch, size, size, dim)).astype(np.float32)
  classes = np.sort(rng.choice(num_classes, present or num_classes, replace=False))
  # Class regions of 9x9 pixels, so classes are spatially grouped as in real label maps.
  coarse = classes[rng.integers(0, len(classes), size=(batch, size // 9 + 1, size // 9 + 1))]
  labels = np.repeat(np.repeat(coarse, 9, 1), 9, 2)[:, :size, :size].astype(np.int32)
  labels.reshape(-1)[:len(classes)] = classes  # every chosen class present
  valid = rng.random((batch, size, size)) > 0.1
  logits = rng.normal(size=(batch, size, size, num_classes)).astype(np.float32)
  prob = np.asarray(jax.nn.softmax(logits + 2.0 * np.eye(num_classes)[labels], -1))
  return jnp.asarray(rep, dtype), jnp.asarray(labels), jnp.asarray(valid), jnp.asarray(prob)


def _time(compiled, runs, *args):
  """Median and min wall seconds and median process CPU seconds after one warm-up call.

  args[0] is a PRNG key, folded with the run number. CPU time (all threads) is reported
  because the wall time on a shared machine mostly measures the other jobs.
  """
  jax.block_until_ready(compiled(*args))  # warm-up
  times, cpu = [], []
  for i in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(jax.random.fold_in(args[0], i), *args[1:]))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(times), min(times), statistics.median(cpu)


def measure(num_classes, runs, dtype, present=None, **loss_kwargs):
  """Forward+backward (median s, min s, CPU s) after warm-up, and XLA temporary bytes."""
  rep, labels, valid, prob = make_inputs(num_classes, dtype=dtype, present=present)

  @jax.jit
  def value_and_grad(key, rep, labels, valid, prob):
    return jax.value_and_grad(
        lambda r: reco.reco_loss(key, r, labels, valid, prob, **loss_kwargs))(rep)

  compiled = value_and_grad.lower(jax.random.key(0), rep, labels, valid, prob).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return _time(compiled, runs, jax.random.key(0), rep, labels, valid, prob) + (temp,)


def measure_bank(num_classes, runs, dtype, size, writes, present=None, **loss_kwargs):
  """As `measure`, for one bank-mode step: enqueue the batch's keys, then the loss.

  The bank starts full (size random entries per class), as it is after the first
  size / writes steps; `writes` valid pixels per class are chosen and enqueued first.
  """
  rep, labels, valid, prob = make_inputs(num_classes, dtype=dtype, present=present)
  rng = np.random.default_rng(1)
  bank = {'keys': jnp.asarray(rng.normal(size=(num_classes, size, rep.shape[-1])),
                              jnp.float32),
          'count': jnp.full(num_classes, size, jnp.int32),
          'pointer': jnp.zeros(num_classes, jnp.int32)}
  pixel_id = jnp.arange(labels.size, dtype=jnp.int32).reshape(labels.shape)

  @jax.jit
  def bank_step(key, rep, labels, valid, prob, bank):
    k_write, k_loss = jax.random.split(key)
    priority = jax.random.bits(k_write, labels.shape, jnp.uint32)
    entries, num_new = reco_bank.choose(rep, labels, valid, priority, pixel_id,
                                        num_classes=num_classes, writes=writes)
    bank = reco_bank.write(bank, entries, num_new)
    value, grad = jax.value_and_grad(
        lambda r: reco.reco_loss(k_loss, r, labels, valid, prob, bank=bank,
                                 **loss_kwargs))(rep)
    return value, grad, bank

  args = (jax.random.key(0), rep, labels, valid, prob, bank)
  compiled = bank_step.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return _time(compiled, runs, *args) + (temp,)


def gather_floor(num_classes, runs, num_queries=256, num_negatives=512, block_rows=8):
  """(median s, min s, CPU s) of only gathering and summing the keys the exact loss reads.

  Draws num_classes x num_queries x num_negatives uniform pixel indices into the VOC-scale
  representation table and sums the gathered rows in blocks of block_rows query rows, as the
  loss gathers them: a lower bound for the per-query loss on this machine.
  """
  rep = make_inputs(num_classes)[0]
  table = rep.reshape(-1, rep.shape[-1])
  blocks = num_classes * num_queries // block_rows

  @jax.jit
  def gather_sum(key, table):
    def body(total, k):
      idx = jax.random.randint(k, (block_rows, num_negatives), 0, table.shape[0])
      return total + jnp.sum(table[idx]), None
    return jax.lax.scan(body, jnp.float32(0), jax.random.split(key, blocks))[0]

  return _time(gather_sum, runs, jax.random.key(0), table)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scales', default='voc,sun')
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--shared', action='store_true', help='also time shared_negatives=True')
  parser.add_argument('--block_rows', type=int, default=None)
  parser.add_argument('--present', default='',
                      help='comma-separated numbers of classes present in the batch '
                           '(default: all of them)')
  parser.add_argument('--floor', action='store_true',
                      help='also time only gathering the keys of the per-query mode')
  parser.add_argument('--bank', type=int, default=0,
                      help='also time bank-mode ReCo with a full bank of this many keys per '
                           'class (config.reco_bank_size)')
  parser.add_argument('--bank_writes', type=int, default=64,
                      help='keys enqueued per class and step (config.reco_bank_writes)')
  args = parser.parse_args()
  modes = [False, True] if args.shared else [False]
  extra = {} if args.block_rows is None else {'block_rows': args.block_rows}
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, rep dtype {args.dtype}')
  print('scale  classes  present  negatives    median_s  min_s  cpu_s  temp_MiB')
  for scale in args.scales.split(','):
    num_classes = SCALES[scale]
    for present in [int(p) for p in args.present.split(',') if p] or [num_classes]:
      for shared in modes:
        median, best, cpu, temp = measure(num_classes, args.runs, args.dtype, present,
                                          shared_negatives=shared, **extra)
        print(f'{scale:5}  {num_classes:7}  {present:7}  '
              f'{"shared" if shared else "per-query":11}  {median:8.3f}  {best:5.3f}  '
              f'{cpu:5.3f}  {temp / 2**20:8.1f}', flush=True)
        if args.bank:
          median, best, cpu, temp = measure_bank(
              num_classes, args.runs, args.dtype, args.bank, min(args.bank_writes, args.bank),
              present, shared_negatives=shared, **extra)
          label = f'bank {args.bank}' + (' sh' if shared else '')
          print(f'{scale:5}  {num_classes:7}  {present:7}  {label:11}  {median:8.3f}  '
                f'{best:5.3f}  {cpu:5.3f}  {temp / 2**20:8.1f}', flush=True)
    if args.floor:
      median, best, cpu = gather_floor(num_classes, args.runs)
      print(f'{scale:5}  {num_classes:7}  {num_classes:7}  {"gather only":11}  {median:8.3f}  '
            f'{best:5.3f}  {cpu:5.3f}         -', flush=True)


if __name__ == '__main__':
  main()
