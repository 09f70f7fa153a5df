"""Launch scripts: the sweep grids and the TPU pod command."""
import collections
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SWEEP = ROOT / 'launch' / 'sweep.py'
TPU = ROOT / 'launch' / 'tpu_pod.sh'


def _sweep(*args):
  out = subprocess.run([sys.executable, str(SWEEP), '--dry-run', *args], check=True,
                       capture_output=True, text=True, cwd=ROOT)
  return [line for line in out.stdout.splitlines() if line]


def _config_args(line):
  config = next(w for w in line.split() if w.startswith('--config='))
  path, _, arg = config[len('--config='):].partition(':')
  return path, dict(kv.split('=') for kv in arg.split(','))


def test_sweep_prints_table1_grid_with_three_seeds():
  lines = _sweep('--tables=1')
  # Per dataset: 3 label counts x 4 methods + all labels x 2 methods, times 3 seeds.
  assert len(lines) == 3 * (3 * 4 + 2) * 3
  cells = collections.Counter()
  for line in lines:
    path, args = _config_args(line)
    dataset = pathlib.Path(path).stem
    cells[(dataset, args['labels'], args['method'], args['reco'])] += 1
    assert line.startswith('python3 -m reco_jax.main ')
    assert f'seed{args["seed"]}' in line  # each seed has its own workdir
  assert set(cells.values()) == {3}
  for dataset, labels in (('voc', ('60', '200', '600')), ('cityscapes', ('20', '50', '150')),
                          ('sun', ('50', '150', '500'))):
    for n in labels:
      assert cells[(dataset, n, 'supervised', 'False')] == 3
      assert cells[(dataset, n, 'classmix', 'False')] == 3
      assert cells[(dataset, n, 'classmix', 'True')] == 3
      assert cells[(dataset, n, 's4gan', 'False')] == 3
    assert cells[(dataset, '0', 'supervised', 'False')] == 3
    assert cells[(dataset, '0', 'supervised', 'True')] == 3
    assert cells[(dataset, '0', 's4gan', 'False')] == 0
  seeds = {_config_args(line)[1]['seed'] for line in lines}
  assert seeds == {'0', '1', '2'}


def test_sweep_prints_table3_partial_grid():
  lines = _sweep('--tables=3')
  assert len(lines) == 2 * 4 * 3
  seen = set()
  for line in lines:
    path, args = _config_args(line)
    assert pathlib.Path(path).stem in ('voc', 'cityscapes')
    assert args['method'] == 'classmix' and args['reco'] == 'True'
    assert 'labels' not in args
    seen.add((pathlib.Path(path).stem, args['partial'], args['seed']))
  assert len(seen) == 24
  assert {p for _, p, _ in seen} == {'p0', 'p1', 'p5', 'p25'}


def test_sweep_prints_table2_pseudoseg_grid():
  lines = _sweep('--tables=2', '--datasets=voc,cityscapes')
  assert len(lines) == 4 * 3 * 3
  cells = collections.Counter()
  for line in lines:
    path, args = _config_args(line)
    assert pathlib.Path(path).stem == 'voc' and args['split'] == 'pseudoseg'
    assert '/table2/voc/' in line
    cells[args['labels'], args['method'], args['reco']] += 1
  assert {k[0] for k in cells} == {'92', '183', '366', '732'} and set(cells.values()) == {3}
  assert {k[1] for k in cells} == {'supervised', 'classmix'}  # no S4GAN in Table 2


def test_sweep_prints_the_unimatch_grid_in_table2s_partition():
  lines = _sweep('--tables=unimatch', '--datasets=voc,cityscapes')
  cells = collections.Counter()
  for line in lines:
    path, args = _config_args(line)
    assert pathlib.Path(path).stem == 'voc' and args['split'] == 'pseudoseg'
    workdir = line.split('--workdir=')[1].split()[0]
    name = 'unimatch_reco' if args['reco'] == 'True' else 'unimatch'
    assert workdir.endswith(f'/table2/voc/{args["labels"]}/{name}/seed{args["seed"]}')
    cells[args['labels'], args['method'], args['reco']] += 1
  assert {k[0] for k in cells} == {'92', '183', '366', '732', '1464'}
  assert {k[1:] for k in cells} == {('unimatch', 'False'), ('unimatch', 'True')}
  assert set(cells.values()) == {3}


def test_sweep_prints_table4_and_fig7_grids():
  lines = _sweep('--tables=4,7c,7d', '--datasets=cityscapes')
  cells = collections.Counter()
  for line in lines:
    path, args = _config_args(line)
    assert pathlib.Path(path).stem == 'cityscapes' and args['labels'] == '20'  # fewest labels
    flags = tuple(w for w in line.split() if w.startswith('--config.'))
    workdir = line.split('--workdir=')[1].split()[0]
    cells[args['method'], args['reco'], args.get('unlabelled_fraction', '1'), flags] += 1
    if (args['method'], args['reco']) in (('classmix', 'True'), ('supervised', 'False'),
                                           ('classmix', 'False'), ('s4gan', 'False')) and (
                                               not flags and 'unlabelled_fraction' not in args):
      assert '/table1/cityscapes/20/' in workdir  # Table 1's own run, not a copy
    else:
      assert '/table4/' in workdir or '/fig7' in workdir
  assert set(cells.values()) == {3}  # every cell once per seed, shared cells listed once
  # Table 4: the unablated row and the three sampling switches.
  for flag in ('--config.query_mode=random', '--config.query_mode=easy',
               '--config.key_mode=random'):
    assert cells['classmix', 'True', '1', (flag,)] == 3
  # Fig. 7c: the fractions of the unlabelled images.
  assert {k[2] for k in cells} == {'0.25', '0.5', '0.75', '1'}
  # Fig. 7d: every base with and without ReCo.
  bases = {(m, r) for m, r, f, flags in cells if f == '1' and not flags}
  assert bases == {(m, r) for m in ('supervised', 'cutout', 'cutmix', 'classmix', 's4gan')
                   for r in ('False', 'True')}
  assert len(lines) == 3 * (4 + 3 + 10 - 1)  # the unablated ReCo + ClassMix is in all three


def test_sweep_rejects_unknown_tables():
  out = subprocess.run([sys.executable, str(SWEEP), '--dry-run', '--tables=1,5'],
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2 and "unknown tables ['5']" in out.stderr


def test_sweep_commands_resolve_to_valid_configs():
  from configs import cityscapes, sun, voc  # noqa: F401
  modules = {'voc': voc, 'cityscapes': cityscapes, 'sun': sun}
  lines = _sweep()
  # Tables 1, 2, 3, then per dataset the new cells of Table 4, Fig. 7c and Fig. 7d.
  assert len(lines) == 126 + 4 * 3 * 3 + 24 + 3 * (3 + 3 + 6) * 3 + 5 * 2 * 3
  workdirs = set()
  for line in lines:
    path, _ = _config_args(line)
    arg = line.split('--config=')[1].split()[0].split(':', 1)[1]
    c = modules[pathlib.Path(path).stem].get_config(arg)
    for flag in (w for w in line.split() if w.startswith('--config.')):
      key, value = flag[len('--config.'):].split('=')
      assert key in c and value in ('random', 'easy'), flag
    assert c.batch_size in (2, 4, 5, 8, 10, 20)  # 8: UniMatch's own
    workdirs.add(line.split('--workdir=')[1].split()[0])
  assert len(workdirs) == len(lines)


def test_sweep_tpu_launcher_and_extra_flags():
  lines = _sweep('--tables=3', '--datasets=voc', '--launcher=tpu', '--tpu_name=pod',
                 '--zone=us-central2-b', '--workdir_root=gs://b/r', '--',
                 '--config.num_train_steps=100')
  assert len(lines) == 12
  words = lines[0].split()
  assert words[:3] == ['launch/tpu_pod.sh', 'pod', 'us-central2-b']
  assert words[4].startswith('gs://b/r/table3/voc/p0/')
  assert words[-1] == '--config.num_train_steps=100'


def test_tpu_script_syntax_and_dry_run():
  subprocess.run(['bash', '-n', str(TPU)], check=True)
  env = dict(os.environ, TFDS_DATA_DIR='gs://bucket/tfds')
  out = subprocess.run(['bash', str(TPU), '--dry-run', 'my-tpu', 'europe-west4-a',
                        'configs/voc.py:labels=200,method=cutmix', 'gs://bucket/run'],
                       check=True, capture_output=True, text=True, env=env).stdout
  ssh = [line for line in out.splitlines() if 'tpu-vm ssh' in line]
  assert len(ssh) == 1
  line = ssh[0]
  assert line.startswith('gcloud compute tpus tpu-vm ssh my-tpu --zone europe-west4-a '
                         '--worker=all --command ')
  assert 'jax[tpu]' in line and 'requirements.txt' in line
  assert 'TFDS_DATA_DIR=' in line and 'gs://bucket/tfds' in line
  assert 'reco_jax.main --distributed' in line
  assert 'configs/voc.py:labels=200,method=cutmix' in line and 'gs://bucket/run' in line
  assert any('tpu-vm scp' in l for l in out.splitlines())  # copies the checkout


def test_tpu_script_rejects_local_workdir():
  env = dict(os.environ, TFDS_DATA_DIR='gs://bucket/tfds')
  out = subprocess.run(['bash', str(TPU), '--dry-run', 'tpu', 'zone', 'configs/voc.py',
                        '/tmp/run'], capture_output=True, text=True, env=env)
  assert out.returncode != 0 and 'gs://' in out.stderr


def test_local_script_syntax():
  subprocess.run(['bash', '-n', str(ROOT / 'launch' / 'local.sh')], check=True)
