"""Class relations in a trained model's embedding spaces (ReCo paper section 5, Figs. 8, 9).

  python -m reco_jax.relations --workdir=runs/voc60 --out=relations/ [--embedding=R|Z|both]

For each embedding space it averages the embedding of every valid validation pixel per class
(the class mean representations, ReCo's prototypes), builds the pair-wise class relation graph
of the paper's Eq. 3, G[p, q] = cos(r_p, r_q), the cosine similarity of the class means, and
clusters the classes hierarchically (SciPy, average linkage on the cosine distance 1 - G):

  relations_E.png / .pdf   heatmap of G with the class names
  dendrogram_E.png / .pdf  the dendrogram of the clustering
  class_means_E.npz        means [C, D], pixel counts [C], G [C, C] and the class names

Embedding spaces: R is the representation head's output (the model's second output, the space
the ReCo loss shapes); Z is the decoder feature both heads read (DeepLabV3+: the concatenated
low-level and upsampled ASPP features; DeepLabV2: the last backbone stage), read as the input
of the classifier's first layer without changing the model. Class means are taken at the
embedding resolution with the labels resized by nearest neighbour, as the ReCo loss computes
its prototypes.

The pure pieces serve the trainer too: `embeddings_fn` (the spaces, for the accumulation of
`reco_jax.class_stats`), `relation_graph`, `relation_image` (the heatmap as a TensorBoard
image) and `make_query_maps_fn` / `query_panel_images` (the paper's Fig. 2 easy and hard
queries).
"""
from collections.abc import Callable, Mapping, Sequence

from absl import app
from absl import flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reco_jax import class_stats
from reco_jax import parallel
from reco_jax import viz
from reco_jax import workdir as workdir_lib
from reco_jax.models import resize

EMBEDDINGS = ('R', 'Z')
EMBEDDING_NAMES = {'R': 'representation R', 'Z': 'decoder feature Z'}
# The submodule whose input is the decoder feature Z, per model class: the first layer of the
# classifier head (DeepLabV3+) or the first of the four dilated classifier convs (DeepLabV2).
_CLASSIFIER_INPUT = {'DeepLabV3Plus': 'classifier_conv', 'DeepLabV2': 'classifier_0'}


def apply_with_embeddings(model: nn.Module, variables, images: jax.Array
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eval-mode logits and the embeddings R and Z of `images`.

  images: float32 [B, H, W, 3] ImageNet-normalised. Returns (logits float32 [B, h, w, C],
  {'R': float32 [B, h, w, rep_dim], 'Z': [B, h, w, D]}) at the decoder resolution. Z is taken
  by intercepting the call of the classifier's first layer (flax nn.intercept_methods), so
  outputs and parameters are those of the plain model.
  """
  kind = type(model).__name__
  if kind not in _CLASSIFIER_INPUT:
    raise ValueError(f'No decoder feature known for {kind}; expected one of '
                     f'{sorted(_CLASSIFIER_INPUT)}.')
  path = (_CLASSIFIER_INPUT[kind],)
  captured = []

  def capture(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path == path:
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    logits, rep = model.apply(variables, images, train=False)
  if len(captured) != 1:
    raise ValueError(f'Expected one call of {path[0]} in {kind}, saw {len(captured)}.')
  return logits, {'R': rep, 'Z': captured[0].astype(jnp.float32)}


def embeddings_fn(model: nn.Module, embeddings: Sequence[str] = EMBEDDINGS) -> Callable:
  """embed(variables, images) -> {E: float32 [B, h, w, D_E]} for each embedding space E in
  `embeddings`, for `class_stats.make_stats_step`."""
  embeddings = _check_embeddings(embeddings)

  def embed(variables, images):
    _, features = apply_with_embeddings(model, variables, images)
    return {name: features[name] for name in embeddings}

  return embed


def relation_graph(means: np.ndarray) -> np.ndarray:
  """The class relation graph of the ReCo paper's Eq. 3: float64 [C, C] cosine similarities.

  means: float [C, D] class mean embeddings (NaN rows for absent classes, whose rows and
  columns come out NaN). G[p, q] = <r_p, r_q> / (|r_p| |r_q|); the diagonal is 1.
  """
  means = np.asarray(means, np.float64)
  if means.ndim != 2:
    raise ValueError(f'relation_graph expects class means [C, D], got {means.shape}.')
  norms = np.linalg.norm(means, axis=1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    unit = means / np.where(norms > 0, norms, np.nan)
  graph = unit @ unit.T
  present = np.isfinite(unit).all(1)
  graph[np.ix_(present, present)] = np.clip(graph[np.ix_(present, present)], -1.0, 1.0)
  graph[present, present] = 1.0
  return graph


def cluster(means: np.ndarray) -> np.ndarray:
  """SciPy linkage [n - 1, 4] of n >= 2 class means: average linkage, cosine distance."""
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top
  means = np.asarray(means, np.float64)
  if means.ndim != 2 or len(means) < 2:
    raise ValueError(f'Clustering needs the means of at least 2 classes, got {means.shape}.')
  return hierarchy.linkage(means, method='average', metric='cosine')


def relation_image(class_means_of_space: class_stats.ClassMeans, class_names: Sequence[str],
                   title: str = '') -> np.ndarray:
  """The relation-graph heatmap of the present classes as uint8 [1, H, W, 3] (TensorBoard)."""
  present = class_means_of_space.present
  graph = relation_graph(class_means_of_space.means[present])
  names = [n for n, p in zip(class_names, present) if p]
  return viz.figure_to_image(viz.relation_figure(graph, names, title=title))


# --------------------------------------------------------------------------- Fig. 2 queries


def query_maps(model: nn.Module, variables, images: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Predictions and the confidence ReCo selects its queries by, at the label size.

  images: float32 [B, H, W, 3]; labels: int [B, H', W'] (255 = void). Returns predictions
  int32 [B, H', W'] and confidence float32 [B, H', W'], the predicted probability of each
  pixel's labelled class (0 on void pixels), from the softmax of the upsampled logits as in
  training.
  """
  logits, _ = model.apply(variables, images, train=False)
  logits = resize.bilinear_align_corners(logits.astype(jnp.float32), labels.shape[1:3])
  prob = jax.nn.softmax(logits, axis=-1)
  labels = labels.astype(jnp.int32)
  labelled = (labels >= 0) & (labels < prob.shape[-1])
  own = jnp.take_along_axis(prob, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
  return (jnp.argmax(logits, axis=-1).astype(jnp.int32),
          jnp.where(labelled, own, 0.0).astype(jnp.float32))


def make_query_maps_fn(model: nn.Module) -> Callable:
  """jax.jit of query_maps for `model`: query_fn(variables, images, labels)."""
  return jax.jit(lambda variables, images, labels: query_maps(model, variables, images,
                                                              labels))


def query_panel_images(config: ml_collections.ConfigDict, variables, batch: Mapping,
                       query_fn: Callable, palette: np.ndarray | None = None) -> np.ndarray:
  """uint8 [n, H, 5W + gaps, 3] Fig. 2 panels of the first n = config.num_image_summaries
  images of a global eval batch (collective on all processes, like the trainer's panels)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = min(config.num_image_summaries, config.eval_batch_size)
  predictions, confidence = query_fn(variables, batch['image'], batch['label'])
  images, labels, predictions, confidence = (
      np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n]
      for x in (batch['image'], batch['label'], predictions, confidence))
  return viz.query_panels(images, labels, predictions, confidence,
                          float(config.strong_threshold), palette=palette)


# --------------------------------------------------------------------------- the tool


def _check_embeddings(embeddings: Sequence[str]) -> tuple[str, ...]:
  embeddings = tuple(embeddings)
  bad = [e for e in embeddings if e not in EMBEDDINGS]
  if bad or not embeddings:
    raise ValueError(f'Unknown embedding {bad or embeddings}: expected R, Z or both.')
  return embeddings


def parse_embedding(text: str) -> tuple[str, ...]:
  """--embedding value -> embeddings: 'R', 'Z' or 'both' (case-insensitive)."""
  value = text.strip().upper()
  if value == 'BOTH':
    return EMBEDDINGS
  if value in EMBEDDINGS:
    return (value,)
  raise ValueError(f'--embedding={text!r}: expected R (representation head), Z (decoder '
                   'feature) or both.')


def write_figures(out_dir: str | epath.Path, name: str, space: class_stats.ClassMeans,
                  class_names: Sequence[str], title: str) -> list[epath.Path]:
  """Heatmap, dendrogram (PNG and PDF) and the npz of one embedding space, in `out_dir`."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  graph = relation_graph(space.means)
  present = space.present
  names = [n for n, p in zip(class_names, present) if p]
  absent = [n for n, p in zip(class_names, present) if not p]
  note = f' (no pixels: {", ".join(absent)})' if absent else ''
  figures = {f'relations_{name}': viz.relation_figure(graph[np.ix_(present, present)], names,
                                                      title=title + note)}
  if len(names) >= 2:
    figures[f'dendrogram_{name}'] = viz.dendrogram_figure(cluster(space.means[present]), names,
                                                          title=title + note)
  written = []
  for stem, fig in figures.items():
    for fmt in ('png', 'pdf'):
      path = out_dir / f'{stem}.{fmt}'
      with path.open('wb') as f:
        fig.savefig(f, format=fmt, dpi=120)
      written.append(path)
  path = out_dir / f'class_means_{name}.npz'
  with path.open('wb') as f:
    np.savez(f, means=space.means, counts=space.counts, relation=graph,
             class_names=np.asarray(class_names))
  written.append(path)
  return written


def relations_of_run(run: workdir_lib.Run, builder, split: str,
                     embeddings: Sequence[str] = EMBEDDINGS, batch_size: int | None = None,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, class_stats.ClassMeans]:
  """Class means of each embedding space over the valid pixels of `split`, with the variables
  the trainer evaluates (the teacher of semi-supervised runs) and its evaluation batches."""
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  embeddings = _check_embeddings(embeddings)
  mesh = mesh or parallel.make_mesh()
  config = run.config
  batch_size = workdir_lib.check_batch(batch_size or config.eval_batch_size)
  batches = pipeline.eval_iterator(
      builder, split=split, eval_size=tuple(config.eval_size), batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  variables = run.eval_variables()
  embed = embeddings_fn(run.model, embeddings)
  num_classes = int(config.num_classes)
  step = class_stats.make_stats_step(embed, num_classes, mesh)
  totals = class_stats.zero_totals(embed, variables, (batch_size, *tuple(config.eval_size), 3),
                                   num_classes, mesh)
  return class_stats.class_means(step, totals, variables, batches, mesh)


def relations_of_workdir(workdir: str, embeddings: Sequence[str] = EMBEDDINGS,
                         checkpoint: str | int = 'best', split: str | None = None,
                         data_dir: str | None = None, batch_size: int | None = None
                         ) -> tuple[dict[str, class_stats.ClassMeans], tuple[str, ...],
                                    workdir_lib.Run]:
  """Loads `checkpoint` of a workdir: (relations_of_run on `split`, class names, the run).

  split: default the trainer's evaluation split; data_dir replaces the config's.
  """
  from reco_jax import data as data_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)
  embeddings = _check_embeddings(embeddings)
  mesh = parallel.make_mesh()
  run = workdir_lib.load_run(workdir, checkpoint, mesh=mesh,
                             overrides={'data_dir': data_dir} if data_dir else None)
  builder = data_lib.prepare_for_config(run.config, flags='--')
  split = data_lib.eval_split(builder, split)
  spaces = relations_of_run(run, builder, split, embeddings, batch_size, mesh)
  return spaces, data_lib.base.class_names(builder), run


def define_flags() -> None:
  """The tool's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir (holds config.json and checkpoints/).')
  flags.DEFINE_string('out', None, 'Output directory for the figures.')
  flags.DEFINE_string('embedding', 'both', 'R (representation head), Z (decoder feature) or '
                      'both.')
  flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
  flags.DEFINE_string('split', None, 'Dataset split (default: the evaluation split).')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir, if not the one in config.json.')
  flags.DEFINE_integer('eval_batch_size', None, "Global batch (default: the config's "
                       'eval_batch_size); a multiple of the device count.')
  flags.mark_flags_as_required(['workdir', 'out'])


@workdir_lib.user_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  f = flags.FLAGS
  embeddings = parse_embedding(f.embedding)
  spaces, names, run = relations_of_workdir(f.workdir, embeddings, f.checkpoint, f.split,
                                            f.data_dir, f.eval_batch_size)
  for name in embeddings:
    title = f'{EMBEDDING_NAMES[name]}, step {run.step}'
    for path in write_figures(f.out, name, spaces[name], names, title):
      print(f'Wrote {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
