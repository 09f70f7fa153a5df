"""Training methods: one module each, and the registry `config.method -> module`.

A method module defines
  train_step(state, batch, key, *, model_fn, mesh, config) -> (state, metrics): one pure step;
  eval_variables(state) -> {'params', 'batch_stats'}: the model that is evaluated and kept;
  BRANCHES: (labelled, unlabelled) images per step in multiples of config.batch_size; a
    method with no unlabelled images gets no 'unlabelled' branch in its batches;
  LOSS_PARTS: the loss terms its metrics carry, shown on the console (ReCo adds reco_loss).
Optionally:
  init_extras(config, key, state) -> dict: the state the method keeps beside the student
    (TrainState.extras), made by `state.create_train_state`;
  check_config(config): raises ValueError for settings the method does not support, called
    by `train.validate_config`;
  config_overrides(config) -> dict: the method's own training settings where they differ
    from the paper config's (optimiser, batch, schedule), applied by `configs/common.py`
    before any `--config.` flag;
  LABELLED_PHOTOMETRIC: False to give the labelled images geometric augmentation only.
`steps.make_train_step` binds the keyword arguments and jits the step. Adding a method is
adding its module and one entry below. This package imports no module of a method until one
is asked for, so configs can read the names cheaply.
"""
import importlib
import types

# Method name -> module of reco_jax.methods. The Mean Teacher methods differ only in how they
# mix the pseudo-labelled images (reco_jax.semi.mixing).
_REGISTRY = {
    'supervised': 'supervised',
    'cutout': 'mean_teacher',
    'cutmix': 'mean_teacher',
    'classmix': 'mean_teacher',
    's4gan': 's4gan',
    'unimatch': 'unimatch',
    # Zhao et al.'s semi-supervised setting: its stages (reco_jax.stages) train supervised.
    'pseudo_label': 'supervised',
}
METHODS = tuple(_REGISTRY)


def get(name: str) -> types.ModuleType:
  """The module of method `name`; a ValueError listing the methods for an unknown one."""
  if name not in _REGISTRY:
    raise ValueError(f'config.method={name!r}: expected one of {METHODS}.')
  return importlib.import_module(f'{__name__}.{_REGISTRY[name]}')
