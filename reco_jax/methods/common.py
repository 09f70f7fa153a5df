"""Pieces every training method's step is made of: keys, student passes, gradients, update.

A model function is the linen `model.apply`: model_fn(variables, images, train=True,
mutable=['batch_stats']) -> ((logits, rep), {'batch_stats': ...}).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from reco_jax import state as state_lib
from reco_jax.models import resize

Metrics = dict[str, jax.Array]


def upsample(logits: jax.Array, size) -> jax.Array:
  """[B, h, w, C] logits -> float32 [B, H, W, C], bilinear with align_corners=True."""
  return resize.bilinear_align_corners(logits.astype(jnp.float32), tuple(size))


def step_keys(key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys one training step uses: (mixing, strong augmentation, ReCo sampling).

  key: the run's base key; step: the state's step counter (int32 scalar). A resumed run
  draws the same numbers because only the step changes the keys.
  """
  k_mix, k_aug, k_reco = jax.random.split(jax.random.fold_in(key, step), 3)
  return k_mix, k_aug, k_reco


def student_pass(model_fn: Callable, params, batch_stats, images: jax.Array, *,
                 keep_rep: bool):
  """One pass in training mode: ((logits, rep or None), updated batch_stats).

  Without ReCo the representations are dropped here, so that no backward pass runs through
  the representation head (with a zero cotangent) when the gradient is taken with jax.vjp.
  """
  (logits, rep), updates = model_fn({'params': params, 'batch_stats': batch_stats}, images,
                                    train=True, mutable=['batch_stats'])
  return (logits, rep if keep_rep else None), updates['batch_stats']


def two_pass_grads(student: Callable, losses: Callable, params, batch_stats,
                   l_images: jax.Array, u_images: jax.Array, *, recompute: bool):
  """Gradient of losses(labelled pass, unlabelled pass) for two passes run in turn.

  Each pass normalises with its own batch statistics and both update the running statistics,
  labelled first (two passes, not one concatenated pass, as the reference's Mean Teacher).
  student(params, batch_stats, images) -> (outputs, new batch_stats);
  losses(l_outputs, u_outputs) -> (loss, parts). Returns (grads, batch_stats, parts).
  recompute: recompute the labelled pass in the backward pass (`_recomputed_grads`).
  """
  if recompute:
    return _recomputed_grads(student, losses, params, batch_stats, l_images, u_images)

  def loss_fn(params):
    l_out, l_stats = student(params, batch_stats, l_images)
    u_out, u_stats = student(params, l_stats, u_images)
    loss, parts = losses(l_out, u_out)
    return loss, (u_stats, parts)

  grads, (new_stats, parts) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, new_stats, parts


def _recomputed_grads(student: Callable, losses: Callable, params, batch_stats,
                      l_images: jax.Array, u_images: jax.Array):
  """`two_pass_grads` holding one pass's activations at a time: the same gradient.

  The labelled pass runs forward keeping nothing, the unlabelled pass runs forward and, once
  the losses' gradients with respect to both passes' outputs are known, backward; only then
  (a data dependency on the finished unlabelled parameter gradient enforces it) does the
  labelled pass run again, forward and backward. Costs one more labelled forward pass.
  """
  l_out, l_stats = student(jax.lax.stop_gradient(params), batch_stats, l_images)
  u_out, u_vjp, u_stats = jax.vjp(lambda p: student(p, l_stats, u_images), params,
                                  has_aux=True)
  (l_cot, u_cot), parts = jax.grad(losses, argnums=(0, 1), has_aux=True)(l_out, u_out)
  (u_grads,) = u_vjp(u_cot)
  # A zero that XLA cannot fold away (x * 0 is NaN for x = inf), computed from an entry of every
  # unlabelled gradient: the recomputation cannot start before that backward pass has ended.
  # (XLA's CPU compiler drops optimisation barriers before scheduling.)
  done = sum(leaf.reshape(-1)[0] for leaf in jax.tree.leaves(u_grads))
  l_images = l_images + (0.0 * done).astype(l_images.dtype)
  _, l_vjp, _ = jax.vjp(lambda p: student(p, batch_stats, l_images), params, has_aux=True)
  (l_grads,) = l_vjp(l_cot)
  return jax.tree.map(jnp.add, l_grads, u_grads), u_stats, parts


def apply_update(state: state_lib.TrainState, grads, batch_stats
                 ) -> tuple[state_lib.TrainState, Metrics]:
  """One optimiser update of the student (the step counter is left to the method).

  Returns the updated state and {'learning_rate': the rate this update used, 'grad_norm'}.
  """
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'learning_rate': state.learning_rate_fn(state.step),
             'grad_norm': optax.tree.norm(grads)}
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32))


def as_float32(metrics: Metrics) -> Metrics:
  return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
