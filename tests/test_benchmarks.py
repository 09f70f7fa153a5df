"""benchmarks/throughput.py: its smoke run prints results that parse; its peak table."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).parents[1]
_PATH = _ROOT / 'benchmarks' / 'throughput.py'


def _load_throughput():
  sys.path.insert(0, str(_PATH.parent))  # Its sibling modules (train_step, input_pipeline).
  try:
    spec = importlib.util.spec_from_file_location('throughput', _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(_PATH.parent))
  return module


def _records(output: str, kind: str) -> list[dict[str, str]]:
  """The `key=value` fields of the output lines that start with `kind`."""
  return [dict(field.split('=', 1) for field in line.split()[1:])
          for line in output.splitlines() if line.split()[:1] == [kind]]


def test_tiny_throughput_run_prints_results_that_parse():
  # The cheapest run that still goes through every part: one precision, two timed steps.
  env = dict(os.environ, PYTHONPATH=str(_ROOT))
  run = subprocess.run(
      [sys.executable, str(_PATH), '--tiny', '--precisions=bf16', '--steps=2',
       '--pipeline_images=6', '--pipeline_batches=1'],
      capture_output=True, text=True, env=env, cwd=_ROOT, timeout=600, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  (result,) = _records(run.stdout, 'result')
  assert result['precision'] == 'bf16'
  for key in ('compile_s', 'step_ms', 'images_per_s', 'gflop_per_step_per_device',
              'tflops_per_device', 'peak_memory_gib'):
    assert float(result[key]) > 0, (key, result)
  assert result['mfu'] == 'n/a'  # No peak is known for a CPU.
  assert result['memory_source'] in ('compiled', 'device', 'device<=')
  (pipeline,) = _records(run.stdout, 'pipeline')
  for key in ('labelled_images_per_s', 'unlabelled_images_per_s', 'both_steps_per_s'):
    assert float(pipeline[key]) > 0, (key, pipeline)
  (feeds,) = _records(run.stdout, 'feeds')
  assert feeds['can_feed'] == ('yes' if float(feeds['headroom']) >= 1 else 'no')
  rows = [line for line in run.stdout.splitlines() if line.startswith('| bf16 |')]
  assert len(rows) == 1 and rows[0].count('|') == 9, rows


@pytest.mark.parametrize('kind, name', [
    ('NVIDIA H100 80GB HBM3', 'H100 SXM'),
    ('NVIDIA H100 PCIe', 'H100 PCIe'),
    ('NVIDIA H200', 'H200 SXM'),
    ('NVIDIA GH200 480GB', 'GH200 (H100 SXM rates)'),
    ('NVIDIA A100-SXM4-80GB', 'A100'),
    ('TPU v4', 'TPU v4'),
    ('TPU v5 lite', 'TPU v5e'),
    ('TPU v5p', 'TPU v5p'),
    ('TPU v6 lite', 'TPU v6e'),
    ('cpu', 'unknown'),
])
def test_peak_table_matches_device_kinds(kind, name):
  throughput = _load_throughput()
  got, peaks = throughput.device_peak(kind)
  assert got == name
  if name != 'unknown':
    assert peaks['bf16'] >= peaks['fp32'] > 0
  assert throughput.device_peak(kind, '100,50')[1] == {'bf16': 100.0, 'fp32': 50.0}
