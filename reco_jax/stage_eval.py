"""What the trainer runs at each evaluation of a stage.

SegmentationEval (a training stage): eval mIoU, pixel accuracy and per-class IoU over the whole
evaluation set, example panels with ReCo's easy and hard queries (ReCo paper Fig. 2), and with
ReCo the class relation graph of the representation space (Fig. 8). ProbeEval (a pretraining
stage): the embedding probe of `class_stats.embedding_probe`.
"""
from reco_jax import class_stats
from reco_jax import evaluation
from reco_jax import names
from reco_jax import relations
from reco_jax import steps
from reco_jax.methods import contrastive_pretraining


def relation_image(config, mesh, embed, stats_step, variables, eval_batches, class_names,
                    step):
  """The relation graph of the class mean representations on the eval set, as an image."""
  totals = class_stats.zero_totals(embed, variables,
                                   (config.eval_batch_size, *config.eval_size, 3),
                                   int(config.num_classes), mesh)
  means = class_stats.class_means(stats_step, totals, variables, eval_batches, mesh)
  return relations.relation_image(means['R'], class_names, f'representation R, step {step}')


class SegmentationEval:
  """Evaluation of a segmentation stage: mIoU, per-class IoU, example panels, relations."""

  def __init__(self, config, model, mesh, class_names):
    self.config, self.model, self.mesh, self.class_names = config, model, mesh, class_names
    self.eval_step = steps.make_eval_step(config, model, mesh)
    self.query_fn = relations.make_query_maps_fn(model)
    if config.reco:  # The class relation graph (ReCo paper Fig. 8) at each evaluation.
      self.embed = relations.embeddings_fn(model, ('R',))
      self.stats_step = class_stats.make_stats_step(self.embed, int(config.num_classes), mesh)

  def __call__(self, state, eval_batches, writer, console, done) -> float:
    config = self.config
    variables = steps.eval_variables(config, state)
    confusion, first = evaluation.confusion_over(self.eval_step, variables, eval_batches,
                                                 self.mesh, config.num_classes)
    miou = evaluation.mean_iou(confusion)
    iou = evaluation.iou_from_confusion(confusion)
    scalars = {names.MIOU_TAG: miou, 'eval/pixel_accuracy': evaluation.pixel_accuracy(confusion)}
    scalars.update({f'eval/iou/{name}': float(v) for name, v in zip(self.class_names, iou)})
    writer.write_scalars(done, scalars)
    if first is not None and config.num_image_summaries:
      # image | ground truth | prediction | easy and hard queries (ReCo paper Fig. 2).
      writer.write_images(done, {'eval/examples': relations.query_panel_images(
          config, variables, first, self.query_fn)})
    if config.reco:
      writer.write_images(done, {'eval/relations_R': relation_image(
          config, self.mesh, self.embed, self.stats_step, variables, eval_batches,
          self.class_names, done)})
    console.evaluation(done, miou)
    return miou


class ProbeEval:
  """Evaluation of a pretraining stage: the embedding probe on the validation pixels."""

  def __init__(self, config, model, mesh):
    self.config, self.mesh = config, mesh
    # Any evaluation size; same parameters.
    self.embed = contrastive_pretraining.probe_embedding(model.clone(embedding_size=None))
    self.stats_step = class_stats.make_stats_step(self.embed, int(config.num_classes), mesh)

  def __call__(self, state, eval_batches, writer, console, done) -> None:
    config, variables = self.config, state.student_variables()
    totals = class_stats.zero_totals(self.embed, variables,
                                     (config.eval_batch_size, *config.eval_size, 3),
                                     int(config.num_classes), self.mesh)
    means = class_stats.class_means(self.stats_step, totals, variables, eval_batches, self.mesh)
    probe = class_stats.embedding_probe(means['P'])
    writer.write_scalars(done, {f'eval/{k}': v for k, v in probe.items()})
    console.probe(done, probe['within_class_cosine'], probe['between_class_cosine'])
