"""Training throughput of the paper's VOC ReCo + ClassMix step, on whatever backend JAX has.

The step: DeepLabV3+ ResNet-101, 21 classes, 321x321 crops, Mean Teacher + ClassMix + ReCo
(configs/voc.py), 10 labelled + 10 unlabelled images per device (config.batch_size = 10 x the
device count), built as training builds it (`steps.make_train_step`), on random images and
block labels (`train_step.random_batch`; every unlabelled pixel valid for ReCo, as there).
For each precision (config precision=fp32|bf16) it prints:
- compile seconds (lower + compile of the jitted step);
- the median seconds of --steps steps after --warmup steps, each synchronised with
  block_until_ready, on a batch already on the devices; images/s counts labelled and
  unlabelled images;
- XLA's FLOPs per step (`compiled.cost_analysis()`, which describes one device's program),
  the TFLOP/s they make per device and the MFU against the device's peak (the table below,
  matched on `jax.devices()[0].device_kind`, or --peak_tflops);
- peak device memory: `memory_stats()['peak_bytes_in_use']` where the backend keeps it (a
  high-water mark of the process: runs go bf16 first, and a run that does not raise it is
  shown as an upper bound), else the compiled step's `memory_analysis()` (arguments + outputs
  + temporaries - donated aliases).
Then the training input pipeline (tf.data on this host's cores, the trainer's own streams for
the same config) on a throwaway `reco_folder` dataset of random VOC-sized JPEGs: labelled and
unlabelled images/s each alone, both together, and whether that feeds the measured step.
Ends with a markdown block of the results and the device kind. `--tiny` shrinks everything
(the config's runlocal: resnet_tiny, 65x65 crops; 2 + 2 images per device, 5 steps, 12
images) and, on a CPU, compiles the step unoptimised: it checks that the benchmark runs.

  PYTHONPATH=. python benchmarks/throughput.py              # the paper's step, fp32 and bf16
  PYTHONPATH=. python benchmarks/throughput.py --tiny       # a smoke run, a minute or two on a CPU
  PYTHONPATH=. python benchmarks/throughput.py --peak_tflops=989,495  # bf16[,fp32] peak
"""
import argparse
import contextlib
import datetime
import io
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from configs import voc  # noqa: E402
from reco_jax import console  # noqa: E402
from reco_jax import inputs  # noqa: E402
from reco_jax import methods  # noqa: E402
from reco_jax import names  # noqa: E402
from reco_jax import parallel  # noqa: E402
from reco_jax import state as state_lib  # noqa: E402
from reco_jax import steps  # noqa: E402
from reco_jax.models import deeplab  # noqa: E402
import input_pipeline  # noqa: E402  (benchmarks/)
import train_step  # noqa: E402  (benchmarks/)

# Dense (no sparsity) peak TFLOP/s per chip, as the vendors publish them: (words that must all
# occur in the lower-cased device_kind, name, bfloat16 peak, float32 peak). Float32 is the rate
# float32 convolutions and matmuls get under JAX's default precision: TF32 tensor cores on
# NVIDIA GPUs, single bfloat16 passes on TPUs (whose float32 peak Google does not publish
# separately). NVIDIA's datasheets quote sparse figures, twice the dense ones:
# https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 1,979, TF32 989; PCIe: 1,513
# and 756; NVL: 1,671 and 835), https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM:
# 1,979 and 989; NVL: 1,671 and 835), https://www.nvidia.com/en-us/data-center/a100/ (BF16
# 624, TF32 312). Google's per-chip BF16 figures: https://cloud.google.com/tpu/docs/v4 (275),
# https://cloud.google.com/tpu/docs/v5e (197), https://cloud.google.com/tpu/docs/v5p (459),
# https://cloud.google.com/tpu/docs/v6e (918). More specific rows come first.
PEAK_TFLOPS = (
    (('h100', 'pcie'), 'H100 PCIe', 756.0, 378.0),
    (('h100', 'nvl'), 'H100 NVL', 835.5, 417.5),
    (('h200', 'nvl'), 'H200 NVL', 835.5, 417.5),
    (('h100',), 'H100 SXM', 989.5, 494.5),
    (('gh200',), 'GH200 (H100 SXM rates)', 989.5, 494.5),
    (('h200',), 'H200 SXM', 989.5, 494.5),
    (('a100',), 'A100', 312.0, 156.0),
    (('tpu', 'v4'), 'TPU v4', 275.0, 275.0),
    (('tpu', 'v5 lite'), 'TPU v5e', 197.0, 197.0),
    (('tpu', 'v5e'), 'TPU v5e', 197.0, 197.0),
    (('tpu', 'v5'), 'TPU v5p', 459.0, 459.0),
    (('tpu', 'v6'), 'TPU v6e', 918.0, 918.0),
)

_SMOKE_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

# Common VOC image sizes (height, width); the synthetic images cycle through them.
_VOC_SIZES = ((375, 500), (500, 375), (333, 500), (375, 500), (500, 333), (366, 500))


def device_peak(device_kind: str, override: str = '') -> tuple[str, dict[str, float]]:
  """(name, {precision: peak TFLOP/s per chip}) of a device; an empty dict when unknown.

  override: '--peak_tflops': 'BF16' (both precisions) or 'BF16,FP32'.
  """
  if override:
    values = [float(v) for v in override.split(',')]
    if len(values) not in (1, 2) or min(values) <= 0:
      raise ValueError(f'--peak_tflops={override}: expected BF16 or BF16,FP32 peak TFLOP/s, '
                       'e.g. --peak_tflops=989,495.')
    return '--peak_tflops', {'bf16': values[0], 'fp32': values[-1]}
  kind = device_kind.lower()
  for words, name, bf16, fp32 in PEAK_TFLOPS:
    if all(w in kind for w in words):
      return name, {'bf16': bf16, 'fp32': fp32}
  return 'unknown', {}


def smoke_compile(args) -> bool:
  """--tiny on a CPU compiles unoptimised: half the compile time, step times of no interest."""
  return args.tiny and jax.default_backend() == 'cpu'


def step_config(args, precision: str):
  """configs/voc.py with `precision` (runlocal with --tiny) at the benchmark's batch and size."""
  arg = f'init_weights=none,precision={precision}' + (',runlocal' if args.tiny else '')
  config = voc.get_config(arg)
  config.batch_size = args.per_device_batch * jax.device_count()
  config.crop_size = (args.size, args.size)
  config.model.backbone = args.backbone
  # As benchmarks/train_step.py: an untrained teacher on random images is rarely confident, so
  # every unlabelled pixel is made valid for ReCo, its most expensive case.
  config.weak_threshold = 0.0
  return config


def _device_peak_bytes() -> int | None:
  """The largest peak_bytes_in_use over the local devices, or None where not kept."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without it raise or say None)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def measure_step(args, precision: str) -> dict:
  """Compile time, step times, FLOPs and memory of one precision's step."""
  config = step_config(args, precision)
  model = deeplab.model_from_config(config)
  mesh = parallel.make_mesh()
  size, batch_size = args.size, config.batch_size
  before = _device_peak_bytes() or 0
  state = state_lib.create_train_state(config, model, jax.random.key(0), (size, size, 3),
                                       mesh=mesh)
  rng = np.random.default_rng(0)
  local = batch_size * jax.local_device_count() // jax.device_count()
  batch = parallel.shard_batch(mesh, train_step.random_batch(
      rng, local, size, config.num_classes, config.method))
  key = jax.random.key(0)
  start = time.perf_counter()
  step = steps.make_train_step(config, model, mesh).lower(state, batch, key).compile(
      _SMOKE_COMPILE if smoke_compile(args) else None)
  compile_s = time.perf_counter() - start
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = step.memory_analysis()
  compiled_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  for _ in range(args.warmup):
    state, metrics = step(state, batch, key)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise FloatingPointError(f'precision={precision}: the loss became {loss}.')
  peak = _device_peak_bytes()
  del state, batch, step, metrics
  seconds = statistics.median(times)
  return dict(precision=precision, compile_s=compile_s, step_s=seconds,
              images_per_s=2 * batch_size / seconds, flops=float(cost['flops']),
              peak_bytes=peak if peak is not None else compiled_bytes,
              memory_source=('compiled' if peak is None else
                             'device' if peak > before else 'device<='),
              loss=loss)


def write_folder_dataset(root: pathlib.Path, num_images: int, num_classes: int,
                         seed: int = 0) -> None:
  """A `reco_folder` dataset of random VOC-sized JPEGs with 3-class block labels.

  Images are smooth random fields with pixel noise; labels hold three classes in 4x4 blocks
  and a void border (VOC outlines its objects with void).
  """
  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'labels').mkdir()
  # num_images training images and 2 validation images of their own.
  stems = [f'img{i:03d}' for i in range(num_images + 2)]
  for i, stem in enumerate(stems):
    height, width = _VOC_SIZES[i % len(_VOC_SIZES)]
    coarse = rng.uniform(0, 255, (height // 24, width // 24, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), float)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(root / 'images' / f'{stem}.jpg', quality=90)
    classes = rng.choice(num_classes, 3, replace=False)
    blocks = classes[rng.integers(0, 3, (4, 4))].astype(np.uint8)
    label = np.asarray(Image.fromarray(blocks).resize((width, height), Image.NEAREST))
    label = label.copy()
    label[:4], label[-4:], label[:, :4], label[:, -4:] = (names.VOID,) * 4
    Image.fromarray(label).save(root / 'labels' / f'{stem}.png')
  (root / 'train.txt').write_text('\n'.join(stems[:num_images]) + '\n')
  (root / 'val.txt').write_text('\n'.join(stems[num_images:]) + '\n')
  (root / 'classes.txt').write_text('\n'.join(f'class{c}' for c in range(num_classes)) + '\n')


def measure_pipeline(args) -> dict:
  """images/s of the trainer's labelled and unlabelled streams for the fp32 step's config."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from reco_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = step_config(args, 'fp32')
  config.labels = args.pipeline_images // 2
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    start = time.perf_counter()
    write_folder_dataset(root / 'raw', args.pipeline_images, config.num_classes)
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS's build messages
      builder = data_lib.prepare('reco_folder', data_dir=str(root / 'tfds'),
                             manual_dir=str(root / 'raw'))
    build_s = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in (root / 'tfds').rglob('*-train.tfrecord*'))

    def streams():
      """Fresh (labelled, unlabelled) iterators: the trainer's own for this config."""
      labelled, unlabelled, _ = inputs.train_streams(
          config, builder, 0, method=methods.get(config.method))
      return labelled, unlabelled

    # Fresh iterators each time, so that no batch prefetched meanwhile is timed.
    batches, warmup = args.pipeline_batches, args.pipeline_warmup
    labelled_s = input_pipeline.seconds_per_batch(streams()[0], batches, warmup)
    unlabelled_s = input_pipeline.seconds_per_batch(streams()[1], batches, warmup)
    both_s = input_pipeline.seconds_per_batch(zip(*streams()), batches, warmup)
  return dict(batch=config.batch_size, build_s=build_s,
              stored_kib=stored / 1024 / args.pipeline_images,
              labelled_per_s=config.batch_size / labelled_s,
              unlabelled_per_s=config.batch_size / unlabelled_s, steps_per_s=1 / both_s)


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def _host() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.partition(':')[2].strip()
        break
  except OSError:
    pass
  return f'{os.cpu_count()} cores, {cpu}'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help="a smoke run: the config's runlocal (resnet_tiny, 65x65 crops), 2 + "
                           '2 images per device, a few steps and a small dataset')
  parser.add_argument('--precisions', default='fp32,bf16',
                      help=f'comma-separated, of {"|".join(names.PRECISIONS)}')
  parser.add_argument('--per_device_batch', type=int, help='images per branch and device (10)')
  parser.add_argument('--size', type=int, help='crop side (321)')
  parser.add_argument('--backbone', help='resnet101')
  parser.add_argument('--steps', type=int, help='timed steps (20)')
  parser.add_argument('--warmup', type=int, help='untimed steps first (3)')
  parser.add_argument('--peak_tflops', default='',
                      help='peak TFLOP/s per chip, BF16 or BF16,FP32, for a device not in the '
                           'table')
  parser.add_argument('--pipeline_images', type=int, help='synthetic images (48)')
  parser.add_argument('--pipeline_batches', type=int, help='timed batches per stream (10); 0 '
                      'skips the pipeline')
  parser.add_argument('--pipeline_warmup', type=int, help='untimed batches first (3)')
  args = parser.parse_args(argv)
  defaults = dict(per_device_batch=10, size=321, backbone='resnet101', steps=20, warmup=3,
                  pipeline_images=48, pipeline_batches=10, pipeline_warmup=3)
  if args.tiny:
    defaults.update(per_device_batch=2, size=65, backbone='resnet_tiny', steps=5, warmup=1,
                    pipeline_images=12)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
  unknown = [p for p in args.precisions if p not in names.PRECISIONS]
  if unknown or not args.precisions:
    parser.error(f'--precisions: expected some of {tuple(names.PRECISIONS)}, got {unknown}.')
  if min(args.per_device_batch, args.size, args.steps) < 1 or args.warmup < 1:
    parser.error('--per_device_batch, --size, --steps and --warmup must be at least 1.')
  return args


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.ERROR)
  # TensorFlow only feeds data: it must not take accelerator memory from JAX.
  tf = console.import_tensorflow(quiet=True)
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  device = jax.devices()[0]
  peak_name, peaks = device_peak(device.device_kind, args.peak_tflops)
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  per_device = f'{args.per_device_batch}+{args.per_device_batch}'
  print(f'jax {jax.__version__}, {jax.device_count()} x {device.device_kind} '
        f'({jax.default_backend()}; peak from {peak_name}), host {_host()}, {date}', flush=True)
  print(f'step: ClassMix + ReCo, {args.backbone}, {args.size}x{args.size}, {per_device} images '
        f'per device (global {args.per_device_batch * jax.device_count()} + '
        f'{args.per_device_batch * jax.device_count()}), median of {args.steps} steps after '
        f'{args.warmup}', flush=True)

  results = {}
  # bf16 first: peak_bytes_in_use is the process's high-water mark, and bf16 should hold less.
  for precision in sorted(args.precisions, key=lambda p: p != 'bf16'):
    r = measure_step(args, precision)
    peak = peaks.get(precision)
    tflops = r['flops'] / r['step_s'] / 1e12
    r.update(tflops=tflops, mfu=tflops / peak if peak else None)
    results[precision] = r
    mfu = f'{r["mfu"]:.4f}' if r['mfu'] is not None else 'n/a'
    print(f'result precision={precision} compile_s={r["compile_s"]:.1f} '
          f'step_ms={r["step_s"] * 1e3:.1f} images_per_s={r["images_per_s"]:.2f} '
          f'gflop_per_step_per_device={r["flops"] / 1e9:.1f} tflops_per_device={tflops:.3f} '
          f'mfu={mfu} peak_memory_gib={_gib(r["peak_bytes"])} '
          f'memory_source={r["memory_source"]} loss={r["loss"]:.3f}', flush=True)

  pipe = None
  if args.pipeline_batches > 0:
    pipe = measure_pipeline(args)
    pipe['headroom'] = {p: pipe['steps_per_s'] * r['step_s'] for p, r in results.items()}
    print(f'pipeline host_cores={os.cpu_count()} images={args.pipeline_images} '
          f'build_s={pipe["build_s"]:.1f} stored_kib_per_image={pipe["stored_kib"]:.0f} '
          f'batch={pipe["batch"]}+{pipe["batch"]} '
          f'labelled_images_per_s={pipe["labelled_per_s"]:.1f} '
          f'unlabelled_images_per_s={pipe["unlabelled_per_s"]:.1f} '
          f'both_steps_per_s={pipe["steps_per_s"]:.2f}', flush=True)
    for precision, r in results.items():
      headroom = pipe['headroom'][precision]
      print(f'feeds precision={precision} step_steps_per_s={1 / r["step_s"]:.2f} '
            f'pipeline_steps_per_s={pipe["steps_per_s"]:.2f} headroom={headroom:.2f} '
            f'can_feed={"yes" if headroom >= 1 else "no"}', flush=True)
  command = ' '.join(['PYTHONPATH=. python benchmarks/throughput.py',
                      *(sys.argv[1:] if argv is None else argv)])
  print()
  print(markdown(args, command, date, peak_name, results, pipe))


def markdown(args, command: str, date: str, peak_name: str, results: dict,
             pipe: dict | None) -> str:
  """The results as a markdown section: heading, command, table, input pipeline."""
  device = jax.devices()[0]
  smoke = ' Compiled unoptimised (--tiny on a CPU).' if smoke_compile(args) else ''
  lines = [
      f'### {device.device_kind} x {jax.device_count()} ({jax.default_backend()}), '
      f'jax {jax.__version__}, {date}', '', f'`{command}`',
      f'ClassMix + ReCo, {args.backbone}, {args.size}x{args.size}, {args.per_device_batch}+'
      f'{args.per_device_batch} images per device; median of {args.steps} steps; host '
      f'{_host()}; peak TFLOP/s from {peak_name}.{smoke}', '',
      '| precision | compile s | step ms | images/s | GFLOP/step/device | TFLOP/s/device | MFU '
      '| peak memory GiB |',
      '|---|---|---|---|---|---|---|---|']
  for p in (p for p in names.PRECISIONS if p in results):
    r = results[p]
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a'
    bound = '<= ' if r['memory_source'] == 'device<=' else ''
    source = ' (compiled)' if r['memory_source'] == 'compiled' else ''
    lines.append(f'| {p} | {r["compile_s"]:.0f} | {r["step_s"] * 1e3:.1f} | '
                 f'{r["images_per_s"]:.1f} | {r["flops"] / 1e9:.0f} | {r["tflops"]:.2f} | '
                 f'{mfu} | {bound}{_gib(r["peak_bytes"])}{source} |')
  if pipe:
    verdict = ', '.join(f'{p} {"yes" if pipe["headroom"][p] >= 1 else "no"} '
                        f'({pipe["headroom"][p]:.2f}x)'
                        for p in names.PRECISIONS if p in results)
    lines += ['', f'Input pipeline (tf.data, {os.cpu_count()} host cores, '
              f'{args.pipeline_images} synthetic VOC-sized JPEGs stored as PNG, '
              f'{pipe["stored_kib"]:.0f} KiB each, batch {pipe["batch"]} + {pipe["batch"]}): '
              f'labelled {pipe["labelled_per_s"]:.1f} images/s, unlabelled '
              f'{pipe["unlabelled_per_s"]:.1f} images/s, both streams together '
              f'{pipe["steps_per_s"]:.2f} steps/s. Feeds the step: {verdict}.']
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
