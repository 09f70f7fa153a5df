"""Two JAX processes on 127.0.0.1 (2 CPU devices each) train together through reco_jax.main."""
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import tensorflow as tf


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _logged(pattern, text):
  return re.findall(pattern, text)


@pytest.mark.slow
def test_two_process_run_completes_and_processes_agree(toy_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  port = _free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             JAX_THREEFRY_PARTITIONABLE='1', TF_CPP_MIN_LOG_LEVEL='3')
  # Supervised + ReCo: the per-device ReCo (shard_map) spans both processes' devices.
  command = [sys.executable, '-m', 'reco_jax.main',
             '--config=configs/toy.py:runlocal,method=supervised,reco=True',
             f'--config.data_dir={toy_data_dir}', '--config.num_train_steps=2',
             '--config.log_every_steps=1', '--config.eval_every_steps=2',
             '--config.checkpoint_every_steps=2',
             # No example panels: one compilation less in each process; images are not checked.
             '--config.num_image_summaries=0', f'--workdir={workdir}',
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--alsologtostderr',
             '--verbosity=0']
  # Logs go to files: a full pipe would block one process while the other waits for it.
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(command + [f'--process_id={i}'], cwd=ROOT, env=env,
                                      stdout=f, stderr=subprocess.STDOUT))
    for p in procs:
      p.wait(timeout=500)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-5000:]}'
    assert 'JAX process %d of 2, 2 local / 4 global devices' % i in out

  # Both processes saw the same losses and hold identical parameter replicas.
  losses = [_logged(r'\[(\d)\] .*train/loss=([-\d.e+]+)', out) for out in outputs]
  assert len(losses[0]) == 2 and losses[0] == losses[1]
  fingerprints = [_logged(r'parameter fingerprint of this process: ([\d.e+]+)', out)
                  for out in outputs]
  assert len(fingerprints[0]) == 1 and fingerprints[0] == fingerprints[1]
  assert float(fingerprints[0][0]) > 0

  # Process 0 alone wrote the TensorBoard events; the checkpoint was written collectively.
  events = list(workdir.glob('events.out.tfevents.*'))
  assert len(events) == 1
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0]))
          for v in e.summary.value}
  assert {'eval/miou', 'train/loss', 'train/reco_loss'} <= tags
  assert (workdir / 'checkpoints' / '2').is_dir()
  assert (workdir / 'labelled_ids.txt').exists() and (workdir / 'config.json').exists()
