"""Train state (student, Mean Teacher, optimiser) and the reference optimiser and schedule.

How the teacher is updated is the Mean Teacher method's (`reco_jax.methods.mean_teacher`).
"""
from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from reco_jax import methods
from reco_jax.losses import reco_bank
from reco_jax.models import imagenet

# The reference steps its PolyLR once per epoch for 200 epochs of equal length (40k iterations
# = 200 x 200), so the learning rate is constant within each two-hundredth of training.
REFERENCE_DECAY_EPOCHS = 200
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


class TrainState(struct.PyTreeNode):
  """Student, teacher and optimiser state; a pytree with the model and optimiser as static fields.

  step: int32 scalar, number of optimiser updates done.
  params / batch_stats: the student's variables.
  ema_params / ema_batch_stats: the Mean Teacher. Its parameters are the EMA of the student's;
    its BatchNorm running statistics are its own, updated when it runs in training mode on the
    unlabelled batch (the reference's EMA averages parameters only, never buffers).
  extras: state a method keeps beside the student (e.g. a discriminator with its optimiser
    state, a feature bank), a dict keyed by the method's own names; checkpointed and restored
    with the rest. Empty for the methods that keep none.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  ema_params: Any
  ema_batch_stats: Any
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  # The schedule inside `tx`, kept to log the rate the update used.
  learning_rate_fn: optax.Schedule = struct.field(pytree_node=False)
  extras: Any = struct.field(default_factory=dict)

  def student_variables(self) -> dict:
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def teacher_variables(self) -> dict:
    return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Polynomial decay exactly as the reference's PolyLR, stepped per epoch.

  lr(step) = max(base * (1 - epoch / E) ** power, min_lr) with E = 200 epochs (or
  config.optimizer.decay_epochs) and epoch = floor(step * E / config.num_train_steps), so
  at 40k steps the rate changes every 200 steps like the reference. When num_train_steps < E,
  or E = 0, every step is its own epoch (plain per-step polynomial decay).
  """
  opt = config.optimizer
  base, power, floor = float(opt.learning_rate), float(opt.poly_power), float(
      opt.min_learning_rate)
  total = int(config.num_train_steps)
  if total <= 0:
    raise ValueError(f'config.num_train_steps must be positive, got {total}.')
  epochs = int(opt.get('decay_epochs', REFERENCE_DECAY_EPOCHS))
  epochs = min(epochs, total) if epochs > 0 else total

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    # Integer arithmetic keeps the epoch boundaries exact (no float rounding at 200, 400, ...).
    epoch = step * epochs // total
    frac = jnp.clip(1.0 - epoch.astype(jnp.float32) / epochs, 0.0, 1.0)
    return jnp.maximum(base * frac ** power, floor).astype(jnp.float32)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """PyTorch-style SGD: weight decay added to the gradient, then Nesterov momentum, then lr.

  Matches torch.optim.SGD(weight_decay=wd, momentum=m, nesterov=True) over all parameters:
  g' = g + wd * p; buf = m * buf + g'; p -= lr * (g' + m * buf).
  With optimizer.head_lr_multiplier != 1, every parameter outside a 'backbone' module moves
  at that multiple of the rate, as a PyTorch parameter group of its own would (UniMatch).
  schedule: the learning rate per step (default `learning_rate_schedule(config)`).
  """
  opt = config.optimizer
  if schedule is None:
    schedule = learning_rate_schedule(config)
  parts = [optax.add_decayed_weights(float(opt.weight_decay)),
           optax.sgd(schedule, momentum=float(opt.momentum), nesterov=bool(opt.nesterov))]
  multiplier = float(opt.get('head_lr_multiplier', 1.0))
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), _outside_backbone))
  return optax.chain(*parts)


def _outside_backbone(params):
  """True for every parameter that no module named 'backbone' holds."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == 'backbone' for k in path), params)


def with_optimizer(state: 'TrainState', config: ml_collections.ConfigDict) -> 'TrainState':
  """`state` with the optimiser (and its schedule) of `config`; the optimiser state is kept."""
  schedule = learning_rate_schedule(config)
  return state.replace(tx=make_optimizer(config, schedule), learning_rate_fn=schedule)


def initialise(module: nn.Module, key: jax.Array, *inputs: jax.Array):
  """module.init(key, *inputs, train=False), jitted and compiled unoptimised on CPU: an
  initialisation runs once, and its many random-number generators compile far longer optimised
  than they run unoptimised (the model's, and those of the state methods keep in `extras`).

  The compiled program is kept for the process, one per module and input shapes (equal modules
  share it): a resumed run, a later stage and the tools initialise the same network again
  without tracing it. Under a trace (`abstract_train_state`) it is module.init itself: only its
  shapes are wanted.
  """
  if any(isinstance(x, jax.core.Tracer) for x in (key, *inputs)):
    return module.init(key, *inputs, train=False)
  specs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (key, *inputs))
  return _compiled_init(module, specs)(key, *inputs)


@functools.lru_cache(maxsize=32)
def _compiled_init(module: nn.Module, specs: tuple[jax.ShapeDtypeStruct, ...]):
  lowered = jax.jit(functools.partial(module.init, train=False)).lower(*specs)
  return lowered.compile(_FAST_COMPILE if jax.default_backend() == 'cpu' else None)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, key: jax.Array,
                       image_shape: Sequence[int], mesh: jax.sharding.Mesh | None = None, *,
                       initial_weights: bool = True) -> TrainState:
  """Initialises the student (from config.init_weights when set), its optimiser and teacher.

  image_shape: (H, W, 3) or (B, H, W, 3) of a training input; only its size matters.
  key: a jax.random key for the random initialisation.
  mesh: when given, every leaf is placed replicated on it.
  initial_weights: load config.init_weights ('imagenet': the cached ImageNet weights,
    fetched first if needed, see reco_jax/models/imagenet.py). False skips it, for a state
    that only gives the structure of a checkpoint to restore or whose weights are replaced.
  The teacher starts as a copy of the student (separate buffers, so the state can be donated).
  A method module with `init_extras(config, key, state) -> dict` (config.method) fills
  `extras` from it, with a key of its own derived from `key`.
  With config.reco_bank_size > 0, extras hold the empty ReCo feature bank (losses/reco_bank.py).
  """
  shape = _input_shape(image_shape)
  variables = _initial_variables(model, key, shape)
  if initial_weights:
    weights = imagenet.resolve(config.get('init_weights', ''),
                               config.get('model', {}).get('backbone'),
                               progress=jax.process_index() == 0)
    if weights.path:
      variables = _load_initial_weights(weights.path, variables)
  return create_train_state_from(config, model, variables, key, shape, mesh=mesh)


def _initial_variables(model: nn.Module, key: jax.Array, shape: tuple[int, ...]) -> dict:
  """The model's random initial variables for inputs of `shape` (batch_stats empty for a model
  without any)."""
  variables = dict(initialise(model, key, jnp.zeros(shape, jnp.float32)))
  variables.setdefault('batch_stats', {})
  return variables


def _input_shape(image_shape: Sequence[int]) -> tuple[int, int, int, int]:
  """(B, H, W, 3) of create_train_state's image_shape."""
  shape = tuple(int(s) for s in image_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'image_shape must be (H, W, 3) or (B, H, W, 3), got {image_shape}.')
  return shape


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                         image_shape: Sequence[int], mesh: jax.sharding.Mesh | None = None
                         ) -> TrainState:
  """The structure of `create_train_state`'s state, every leaf a jax.ShapeDtypeStruct
  (replicated on `mesh`, or on the first local device without one): a checkpoint's restore
  target, found without initialising or compiling anything."""
  shape = _input_shape(image_shape)

  def build(key):
    return create_train_state_from(config, model, _initial_variables(model, key, shape), key,
                                   shape)

  state = jax.eval_shape(build, jax.random.key(0))
  sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
              else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state)


def _load_initial_weights(path: str, variables: dict) -> dict:
  """config.init_weights into the variables; a pretraining network's go to its segmenter."""
  from reco_jax.models import convert  # torch/safetensors readers only when needed
  if 'segmenter' not in variables['params']:
    return dict(convert.load_initial_weights(path, variables))
  inner = {c: v['segmenter'] for c, v in variables.items() if 'segmenter' in v}
  loaded = convert.load_initial_weights(path, inner)
  return {c: {**v, 'segmenter': loaded[c]} if c in loaded else v for c, v in variables.items()}


def create_train_state_from(config: ml_collections.ConfigDict, model: nn.Module,
                            variables: dict, key: jax.Array, image_shape: Sequence[int],
                            mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """A step-0 state of the given {'params', 'batch_stats'}: a fresh optimiser of config, a
  teacher that copies the student and the extras (see create_train_state; key and the
  (B, H, W, 3) image_shape as there); every leaf replicated on `mesh` when given."""
  dummy = jax.ShapeDtypeStruct(tuple(int(s) for s in image_shape), jnp.float32)
  schedule = learning_rate_schedule(config)
  tx = make_optimizer(config, schedule)
  params, batch_stats = variables['params'], variables['batch_stats']
  extras = _reco_bank_extras(config, model, variables, dummy)
  opt_state, ema_params, ema_batch_stats = _fresh_optimizer_and_teacher(tx, params, batch_stats)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=ema_params,
      ema_batch_stats=ema_batch_stats,
      apply_fn=model.apply,
      tx=tx,
      learning_rate_fn=schedule,
      extras=extras,
  )
  method = config.get('method')
  init_extras = methods.get(method).init_extras if method else None
  if init_extras is not None:
    state = state.replace(extras={**state.extras,
                                  **init_extras(config, jax.random.fold_in(key, 1), state)})
  if mesh is not None:
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return state


@functools.partial(jax.jit, static_argnums=0)  # one program, not a compiled operation per leaf
def _fresh_optimizer_and_teacher(tx: optax.GradientTransformation, params, batch_stats):
  """tx's initial state for `params`, and the teacher's copies of the student's variables."""
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return tx.init(params), copy(params), copy(batch_stats)


def _reco_bank_extras(config, model, variables, dummy) -> dict:
  """The empty ReCo feature bank when config.reco_bank_size > 0 (losses/reco_bank.py), else {}.

  Its representation width and class count are read from the model's output shapes.
  """
  if not reco_bank.settings(config)[0]:
    return {}
  logits, rep = jax.eval_shape(functools.partial(model.apply, train=False), variables, dummy)
  return reco_bank.init_extras(config, logits.shape[-1], rep.shape[-1])
