"""The stages of a run: what `train.train_and_evaluate` runs, in order, and where.

A run without pretraining (config.pretrain == 'none') other than method=pseudo_label is one
training stage in the workdir itself. Otherwise each stage has a sub-folder of the workdir with
its own config.json, TensorBoard events and checkpoints (Zhao et al., ICCV 2021):
- pretrain=within|cross, any method: `pretrain/` (the contrastive loss on the labelled images,
  config.pretrain_steps steps with config.pretrain_optimizer), then `finetune/` (config.method
  for config.num_train_steps, from the pretrained backbone and decoder with a new classifier);
- method=pseudo_label (supplementary section 2): `stage0/` (supervised training on the labelled
  images, itself `stage0/pretrain/` + `stage0/finetune/` when pretraining), `pseudo_labels/`
  (stage 0's predictions on the unlabelled images), then supervised training on labelled +
  pseudo-labelled images: `pretrain/` + `finetune/`, or `train/` without pretraining.
A stage whose checkpoints reach its last step, or a complete pseudo-label folder, is done and
is never run again; a killed run started again with the same command continues in the first
stage that is not done, from its latest checkpoint.
"""
import dataclasses
import json

from etils import epath
import ml_collections

TRAIN, PRETRAIN, PSEUDO_LABELS = 'train', 'pretrain', 'pseudo_labels'
# Config methods that are plans of stages rather than methods, and the method their training
# stages use: method=pseudo_label is Zhao et al.'s self-training (`plan`).
STAGE_PLANS = {'pseudo_label': 'supervised'}
# Written at the top of a run of several stages: their folders and kinds, and the final one.
STAGES_FILE = 'stages.json'


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run.

  folder: relative to the run's workdir ('' = the workdir itself).
  kind: TRAIN (config.method), PRETRAIN (contrastive pretraining) or PSEUDO_LABELS.
  config: the config the stage runs with (method, steps and optimiser of this stage).
  init_from: folder of the PRETRAIN stage whose final state initialises a TRAIN stage.
  pseudo_labels: folder of the pseudo-label dataset a TRAIN or PRETRAIN stage reads beside
    the labelled images; for a PSEUDO_LABELS stage, the folder of the model that labels.
  """
  folder: str
  kind: str
  config: ml_collections.ConfigDict
  init_from: str | None = None
  pseudo_labels: str | None = None


def _join(prefix: str, name: str) -> str:
  return '/'.join(part for part in (prefix, name) if part)


def _copy(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    out[key] = value
  return out


def pretraining_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of a pretraining stage: its steps and optimiser in place of training's."""
  # No ReCo (nor its feature bank) in this stage: the contrastive loss is its only loss.
  return _copy(config, num_train_steps=int(config.pretrain_steps),
               optimizer=config.pretrain_optimizer.to_dict(), reco=False, reco_bank_size=0)


def _training(config, prefix: str, *, method: str, pseudo: str | None,
              single_folder: str) -> list[Stage]:
  """Training with `method`, after pretraining when config.pretrain != 'none'."""
  trained = _copy(config, method=method)
  if config.pretrain == 'none':
    return [Stage(_join(prefix, single_folder), TRAIN, trained, pseudo_labels=pseudo)]
  pretrain = _join(prefix, 'pretrain')
  return [Stage(pretrain, PRETRAIN, pretraining_config(trained), pseudo_labels=pseudo),
          Stage(_join(prefix, 'finetune'), TRAIN, trained, init_from=pretrain,
                pseudo_labels=pseudo)]


def plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages of config's run, in order (see the module docstring)."""
  if config.method not in STAGE_PLANS:
    return _training(config, '', method=config.method, pseudo=None, single_folder='')
  method = STAGE_PLANS[config.method]  # pseudo_label: self-training with `method`.
  first = _training(config, 'stage0', method=method, pseudo=None, single_folder='')
  labeller = Stage(PSEUDO_LABELS, PSEUDO_LABELS, first[-1].config,
                   pseudo_labels=first[-1].folder)
  final = _training(config, '', method=method, pseudo=PSEUDO_LABELS, single_folder='train')
  return first + [labeller] + final


def write_index(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """workdir/stages.json: the stages of a run of several, so tools find its final model."""
  plan_ = plan(config)
  index = {'stages': [{'folder': s.folder, 'kind': s.kind} for s in plan_],
           'final': plan_[-1].folder}
  (epath.Path(workdir) / STAGES_FILE).write_text(json.dumps(index, indent=2))


def final_stage_dir(workdir: str | epath.Path) -> epath.Path:
  """The folder holding a run's final model: workdir itself, or its final stage's folder."""
  workdir = epath.Path(workdir)
  index = workdir / STAGES_FILE
  if not index.exists():
    return workdir
  return workdir / json.loads(index.read_text())['final']


def describe(stage: Stage) -> str:
  """The stage in words, for the console."""
  c = stage.config
  if stage.kind == PRETRAIN:
    return f'{c.pretrain}-image contrastive pretraining, {c.num_train_steps} steps,'
  if stage.kind == PSEUDO_LABELS:
    return f'pseudo-labels of the unlabelled images from {stage.pseudo_labels},'
  extra = ' on labelled + pseudo-labelled images' if stage.pseudo_labels else ''
  start = ' from the pretrained network' if stage.init_from else ''
  return f'{c.method}{" + ReCo" * bool(c.reco)}{extra}{start}, {c.num_train_steps} steps,'
