"""What contrastive pretraining (Zhao et al.) leaves in the network, probed on frozen features.

  PYTHONPATH=. python benchmarks/pretraining_probe.py --workdir=W [--data_dir=D]

W is a toy run with pretrain=within|cross whose pretraining stage has finished (W/pretrain/).
For the network at initialisation (the pretraining stage's own starting point) and after
pretraining, on the features that pretraining shapes and fine-tuning starts from (the
decoder's last hidden layer, `features_only`):
- a linear probe: softmax regression on the frozen features of the run's labelled images
  (crops of the labelled stream, geometric augmentation only), fitted full-batch, then eval
  mIoU (%) on the validation images at the feature resolution (labels resized by nearest on
  the align_corners grid, as the pretraining loss resizes them);
- the embedding probe (`class_stats.embedding_probe`, the trainer's `eval/cosine_gap`) on the
  validation images in colour and in grey (the second view's distortion greys 20 % of the
  images; the toy's classes are textures in hue bands, so grey removes what tells most of them
  apart).
Prints one markdown table.
"""
import argparse
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from reco_jax import class_stats  # noqa: E402
from reco_jax import data as data_lib  # noqa: E402
from reco_jax import evaluation  # noqa: E402
from reco_jax import methods  # noqa: E402
from reco_jax import normalization  # noqa: E402
from reco_jax import parallel  # noqa: E402
from reco_jax import stages  # noqa: E402
from reco_jax import state as state_lib  # noqa: E402
from reco_jax import workdir as workdir_lib  # noqa: E402
from reco_jax.data import pipeline  # noqa: E402
from reco_jax.methods import contrastive_pretraining  # noqa: E402
from reco_jax.models import resize  # noqa: E402
from reco_jax.semi import augment  # noqa: E402


def _networks(workdir, mesh):
  """(config, pretraining network, {name: its variables}) at initialisation and after."""
  config = workdir_lib.read_config(workdir / 'pretrain')
  network, _ = methods.stage_model(stages.Stage('pretrain', stages.PRETRAIN, config))
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  start = state_lib.create_train_state(config, network, init_key,
                                       (*tuple(config.crop_size), 3), mesh=mesh)
  step = int(config.num_train_steps)
  end = workdir_lib.restore_state(config, network, workdir / 'pretrain' / 'checkpoints', step,
                                  mesh=mesh)
  variables = {'initialisation': start.student_variables(),
               f'after {step:,} pretraining steps': end.student_variables()}
  return config, network, variables


def _features(network, variables, images):
  """The decoder's last hidden layer (what fine-tuning starts from): float32 [B, h, w, D]."""
  segmenter = {k: v['segmenter'] for k, v in variables.items()}
  return network.segmenter.apply(segmenter, images, False).astype(jnp.float32)


def _pixels(network, variables, batches, num_classes):
  """(features [P, D], labels [P]) of the labelled pixels of `batches` at the feature grid."""
  feats, labels = [], []
  for batch in batches:
    f = np.asarray(_features(network, variables, jnp.asarray(batch['image'])))
    small = np.asarray(resize.nearest_align_corners(jnp.asarray(batch['label']), f.shape[1:3]))
    keep = small < num_classes
    feats.append(f[keep])
    labels.append(small[keep])
  return np.concatenate(feats), np.concatenate(labels)


def linear_probe_miou(train, val, num_classes: int, steps: int = 500) -> float:
  """Softmax regression fitted on train (features, labels), eval mIoU on val."""
  x, y = (jnp.asarray(a) for a in train)
  mean, std = x.mean(0), x.std(0) + 1e-6
  params = {'w': jnp.zeros((x.shape[1], num_classes)), 'b': jnp.zeros(num_classes)}
  tx = optax.adam(0.05)

  def loss_fn(p):
    logits = ((x - mean) / std) @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1e-4 * jnp.sum(
        p['w'] ** 2)

  @jax.jit
  def update(p, opt):
    grads = jax.grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(p, updates), opt

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = update(params, opt)
  vx, vy = val
  pred = np.asarray(jnp.argmax(((jnp.asarray(vx) - mean) / std) @ params['w'] + params['b'], -1))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (vy, pred), 1)
  return 100 * evaluation.mean_iou(confusion)


def _grey(images):
  grey = augment.grey(jnp.clip(normalization.denormalize(images), 0.0, 1.0))
  return normalization.normalize(jnp.broadcast_to(grey, images.shape))


def cosine_gaps(network, variables, eval_batches, config, mesh, transform=None):
  """The embedding probe's cosine gap of the validation pixels (optionally transformed)."""
  probe = contrastive_pretraining.probe_embedding(network.clone(embedding_size=None))
  embed = probe if transform is None else (lambda v, x: probe(v, transform(x)))
  num_classes = int(config.num_classes)
  step = class_stats.make_stats_step(embed, num_classes, mesh)
  totals = class_stats.zero_totals(embed, variables,
                                   (config.eval_batch_size, *config.eval_size, 3), num_classes,
                                   mesh)
  means = class_stats.class_means(step, totals, variables, eval_batches, mesh)
  return class_stats.embedding_probe(means['P'])['cosine_gap']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--train_batches', type=int, default=20,
                      help='batches of the labelled stream the linear probe is fitted on')
  args = parser.parse_args()
  import pathlib  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(args.workdir)
  mesh = parallel.make_mesh(jax.devices()[:1])
  config, network, variables = _networks(workdir, mesh)
  if args.data_dir:
    config.data_dir = args.data_dir
  builder = data_lib.prepare_for_config(config, flags='--')
  num_classes = int(config.num_classes)
  data = pipeline.TrainData(
      num_labels=config.labels, min_classes=config.min_classes, num_classes=num_classes,
      partial='', crop_size=tuple(config.crop_size), scale_range=(1.0, 1.0),
      labelled_batch=config.batch_size, unlabelled_batch=0, seed=config.seed,
      subset=config.subset, labelled_photometric=False)
  eval_batches = pipeline.eval_iterator(builder, split=data_lib.eval_split(builder),
                                        eval_size=tuple(config.eval_size),
                                        batch_size=config.eval_batch_size)
  print(f'{workdir}: pretrain={config.pretrain}, {config.labels} labels, seed {config.seed}')
  print('| network | linear probe mIoU (%) | cosine gap, colour | cosine gap, grey |')
  print('|---|---|---|---|')
  for name, v in variables.items():
    stream, _, _ = pipeline.train_iterators(builder, data)
    train = _pixels(network, v, (next(stream) for _ in range(args.train_batches)), num_classes)
    val = _pixels(network, v, eval_batches, num_classes)
    miou = linear_probe_miou(train, val, num_classes)
    colour = cosine_gaps(network, v, eval_batches, config, mesh)
    grey = cosine_gaps(network, v, eval_batches, config, mesh, _grey)
    print(f'| {name} | {miou:.1f} | {colour:.3f} | {grey:.3f} |', flush=True)


if __name__ == '__main__':
  main()
