"""What the trainer knows of a training method: one typed record per method module."""
from collections.abc import Callable
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method (or contrastive pretraining), as each method module declares it.

  name: the module's method (the registry may name several config methods after one module).
  branches: (labelled, unlabelled) images per step in multiples of config.batch_size; a method
    with no unlabelled images gets no 'unlabelled' branch in its batches.
  loss_parts: the loss terms its metrics carry, shown on the console (ReCo adds reco_loss).
  train_step: train_step(state, batch, key, *, model_fn, mesh, config) -> (state, metrics),
    one pure step; `steps.make_train_step` binds the keyword arguments and jits it.
  eval_variables: eval_variables(state) -> {'params', 'batch_stats'}, the model that is
    evaluated and kept.
  init_extras: init_extras(config, key, state) -> dict, the state the method keeps beside the
    student (TrainState.extras), made by `state.create_train_state`; None for none.
  check_config: check_config(config) raises ValueError for settings the method does not
    support, called by `config_checks.validate_config`; None when it has none.
  config_overrides: config_overrides(config) -> dict, the method's own training settings where
    they differ from the paper config's (optimiser, batch, schedule), applied by
    `configs/common.py` before any `--config.` flag; None to keep the paper's.
  labelled_photometric: False to give the labelled images geometric augmentation only.
  """
  name: str
  branches: tuple[int, int]
  loss_parts: tuple[str, ...]
  train_step: Callable[..., tuple[Any, dict]]
  eval_variables: Callable[[Any], dict]
  init_extras: Callable[..., dict] | None = None
  check_config: Callable[[Any], None] | None = None
  config_overrides: Callable[[Any], dict] | None = None
  labelled_photometric: bool = True
