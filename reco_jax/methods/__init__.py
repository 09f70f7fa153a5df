"""Training methods: one module each, and the registry `config.method -> Method`.

A method module declares what the trainer knows of it in one record, `METHOD =
interface.Method(name, branches, loss_parts, train_step, eval_variables, ...)` (the fields are
documented in `reco_jax.methods.interface`). Adding a method is adding its module and one entry
below. This package imports no module of a method until one is asked for, so configs can read
the names cheaply.
"""
import importlib

from reco_jax import stages
from reco_jax.methods import interface

# Method name -> module of reco_jax.methods. The Mean Teacher methods differ only in how they
# mix the pseudo-labelled images (reco_jax.semi.mixing).
_REGISTRY = {
    'supervised': 'supervised',
    'cutout': 'mean_teacher',
    'cutmix': 'mean_teacher',
    'classmix': 'mean_teacher',
    's4gan': 's4gan',
    'unimatch': 'unimatch',
}
# Plans of stages (`stages.STAGE_PLANS`, e.g. pseudo_label) are config methods too: `get` gives
# the method their training stages use.
_REGISTRY.update({plan: _REGISTRY[method] for plan, method in stages.STAGE_PLANS.items()})
METHODS = tuple(_REGISTRY)


def get(name: str) -> interface.Method:
  """The method `name` trains with; a ValueError listing the methods for an unknown one."""
  if name not in _REGISTRY:
    raise ValueError(f'config.method={name!r}: expected one of {METHODS}.')
  return importlib.import_module(f'{__name__}.{_REGISTRY[name]}').METHOD


def stage_model(stage: stages.Stage) -> tuple[object, interface.Method]:
  """(model, method) of a training or pretraining stage of `reco_jax.stages`."""
  from reco_jax.models import deeplab  # pylint: disable=g-import-not-at-top  (flax, lazily)
  if stage.kind == stages.PRETRAIN:
    pretraining = importlib.import_module(f'{__name__}.contrastive_pretraining')
    segmenter = deeplab.model_from_config(stage.config, features_only=True)
    return pretraining.build_network(stage.config, segmenter), pretraining.METHOD
  return deeplab.model_from_config(stage.config), get(stage.config.method)
