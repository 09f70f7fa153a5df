"""How far training moves a network from where it started, at each kept checkpoint.

  PYTHONPATH=. python benchmarks/finetune_drift.py --workdir=W [--workdir=W2 ...]

W is a training run (one stage, or a pretrained run whose final stage is `finetune/`). Its
start is rebuilt as the trainer builds it (`train.initial_state`): the config seed's
initialisation, and for a fine-tuning stage the pretraining stage's final backbone and decoder.
For each checkpoint kept in the final stage (the latest ones and the best), and for each of the
network's top-level parameter groups, prints the relative distance ||p - p0|| / ||p0|| (L2 over
the group's parameters), beside the step's evaluation mIoU. A fine-tuned network that stays
close to its pretrained start keeps what pretraining put there; one that moves as far as a
network trained from scratch keeps little of it.
"""
import argparse
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from reco_jax import methods  # noqa: E402
from reco_jax import parallel  # noqa: E402
from reco_jax import results  # noqa: E402
from reco_jax import stages  # noqa: E402
from reco_jax import train  # noqa: E402
from reco_jax import workdir as workdir_lib  # noqa: E402


def relative_distances(params: dict, start: dict) -> dict[str, float]:
  """{group: ||params[group] - start[group]|| / ||start[group]||} over the top-level groups."""
  out = {}
  for group in sorted(start):
    pairs = zip(jax.tree.leaves(params[group]), jax.tree.leaves(start[group]))
    moved = sum(float(np.sum((np.asarray(p, np.float64) - np.asarray(s, np.float64)) ** 2))
                for p, s in pairs)
    size = sum(float(np.sum(np.asarray(s, np.float64) ** 2))
               for s in jax.tree.leaves(start[group]))
    out[group] = float(np.sqrt(moved / size)) if size else float('nan')
  return out


def drift(workdir: pathlib.Path, mesh) -> list[tuple[int, str, dict[str, float]]]:
  """[(step, 'best' or '', distances)] for the final stage's kept checkpoints."""
  config = workdir_lib.read_config(workdir)
  stage = stages.plan(config)[-1]
  model, _ = methods.stage_model(stage)
  start = parallel.to_host(train.initial_state(stage, workdir, model, mesh).params)
  final = workdir / stage.folder
  rows = []
  for folder, tag in ((workdir_lib.CHECKPOINTS, ''), (workdir_lib.BEST_CHECKPOINTS, 'best')):
    directory = final / folder
    for step in workdir_lib.checkpoint_steps(directory, best=bool(tag))[0]:
      state = workdir_lib.restore_state(stage.config, model, directory, step, mesh=mesh)
      rows.append((step, tag, relative_distances(parallel.to_host(state.params), start)))
  return sorted(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', action='append', required=True)
  args = parser.parse_args()
  mesh = parallel.make_mesh(jax.devices()[:1])
  for workdir in map(pathlib.Path, args.workdir):
    miou = results.load_result(workdir).miou
    rows = drift(workdir, mesh)
    groups = list(rows[0][2]) if rows else []
    print(f'\n{workdir}')
    print('| step | eval mIoU (%) | ' + ' | '.join(groups) + ' |')
    print('|---|---|' + '---|' * len(groups))
    for step, tag, distances in rows:
      score = f'{100 * miou[step]:.1f}' if step in miou else ''
      print(f'| {step}{" (best)" if tag else ""} | {score} | '
            + ' | '.join(f'{distances[g]:.3f}' for g in groups) + ' |', flush=True)


if __name__ == '__main__':
  main()
