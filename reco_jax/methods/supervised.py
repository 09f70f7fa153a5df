"""Supervised training on the labelled images, optionally with ReCo.

The ReCo paper's "Supervised" baseline and its "ReCo + Supervised" rows (section 4.1,
Tables 1 and 3; the reference's `train_sup.py`): cross-entropy on the labelled images, plus
the ReCo loss on their representations when config.reco.
"""
import jax
import jax.numpy as jnp
import ml_collections

from reco_jax import names
from reco_jax import state as state_lib
from reco_jax.losses import reco_recipe
from reco_jax.losses import segmentation
from reco_jax.methods import common
from reco_jax.methods import interface

# 2 x batch_size labelled images, as the reference's supervised runs.
BRANCHES = (2, 0)
LOSS_PARTS = ('sup_loss',)


def supervised_losses(out, labels: jax.Array, key: jax.Array, *, mesh: jax.sharding.Mesh,
                      config: ml_collections.ConfigDict,
                      bank: dict | None = None) -> tuple[jax.Array, common.Metrics]:
  """Total loss and its parts from one labelled pass's (logits, rep or None).

  labels: int32 [B, H, W] (255 = void); key: the step's ReCo key; bank: the ReCo feature
  bank or None (`reco_recipe.bank_of`); the parts then also hold the updated bank.
  """
  logits, rep = out
  sup = segmentation.cross_entropy(common.upsample(logits, labels.shape[1:3]), labels,
                                   ignore_label=names.VOID)
  zero = jnp.zeros((), jnp.float32)
  reco, extra = zero, {}
  if config.reco:
    branch = reco_recipe.labelled_branch(rep, logits, labels)
    reco = reco_recipe.reco_term(key, [branch], mesh=mesh, config=config, bank=bank)
    if bank is not None:
      reco, extra[reco_recipe.BANK] = reco
  loss = sup + reco
  return loss, {'loss': loss, 'sup_loss': sup, 'unsup_loss': zero, 'reco_loss': reco, **extra}


def train_step(state: state_lib.TrainState, batch, key: jax.Array, *, model_fn,
               mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """One supervised step: (state, metrics); batch as `steps.make_train_step` describes."""
  _, _, k_reco = common.step_keys(key, state.step)
  images, labels = batch['labelled']['image'], batch['labelled']['label']
  bank = reco_recipe.bank_of(state, config)

  def loss_fn(params):
    out, batch_stats = common.student_pass(model_fn, params, state.batch_stats, images,
                                           keep_rep=config.reco)
    loss, parts = supervised_losses(out, labels, k_reco, mesh=mesh, config=config, bank=bank)
    return loss, (batch_stats, parts)

  grads, (batch_stats, parts) = jax.grad(loss_fn, has_aux=True)(state.params)
  state, parts = reco_recipe.keep_bank(state, parts)
  state, metrics = common.apply_update(state, grads, batch_stats)
  return state.replace(step=state.step + 1), common.as_float32({**parts, **metrics})


def eval_variables(state: state_lib.TrainState) -> dict:
  """The student is the model."""
  return state.student_variables()


METHOD = interface.Method(
    name='supervised', branches=BRANCHES, loss_parts=LOSS_PARTS, train_step=train_step,
    eval_variables=eval_variables)
