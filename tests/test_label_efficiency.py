"""The label-efficiency benchmark's store of runs and the results file made from it."""
import importlib.util
import json
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[1] / 'benchmarks' / 'label_efficiency.py'
_SPEC = importlib.util.spec_from_file_location('label_efficiency', _PATH)
le = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(le)


def _entry(method, labels, seed, miou, **kw):
  return {'method': method, 'labels': labels, 'seed': seed,
          'miou': {str(s): v for s, v in miou.items()}, 'minutes': 10.0,
          'date': '2026-12-03', 'command': 'cmd', 'context': 'here', **kw}


def test_score_is_the_mean_of_the_last_evaluations_in_step_order():
  entry = _entry('supervised', 30, 0, {250: 0.1, 2000: 0.5, 1750: 0.3, 500: 0.9})
  assert le.score(entry, 2) == pytest.approx(0.4)  # steps 1750 and 2000, not by string order
  assert le.score(entry, 1) == pytest.approx(0.5)
  assert le.score({'score': 0.25}, 2) == 0.25  # a run kept as its score only


def test_report_grows_with_the_store():
  store = {}
  for seed, (sup, cm) in enumerate([(0.20, 0.30), (0.22, 0.36), (0.24, 0.33)]):
    store[f'supervised_l30_s{seed}'] = _entry('supervised', 30, seed, {2000: sup})
    store[f'classmix_l30_s{seed}'] = _entry('classmix', 30, seed, {2000: cm})
  store['supervised_l50_s3'] = _entry('supervised', 50, 3, {2000: 0.4}, date='2026-12-04')
  store['supervised_l50_s4'] = _entry('supervised', 50, 4, {2000: 0.5}, date='2026-12-04')
  store['classmix_l50_s4'] = _entry('classmix', 50, 4, {2000: 0.6}, date='2026-12-04')
  lines, scores, methods, budgets = le.report(store, 1, 'store.json')
  assert budgets == [30, 50] and [m.key for m in methods] == ['supervised', 'classmix']
  assert scores['supervised', 50] == {3: 0.4, 4: 0.5}
  text = '\n'.join(lines)
  assert '| method | 30 labels | 50 labels |' in text
  assert '| Supervised | 22.0 (20.0-24.0) | 45.0 (40.0-50.0; 2 seeds) |' in text
  assert '| ClassMix | 33.0 (30.0-36.0) | 60.0 (1 seed) |' in text
  assert '- ClassMix - Supervised, 30 labels: +10.0, +14.0, +9.0 (mean +11.0)' in text
  # Paired over the seeds both rows have.
  assert '- ClassMix - Supervised, 50 labels: +10.0 (seeds 4; mean +10.0)' in text
  assert '- 2026-12-03, 6 runs: `cmd`, here; 60 min of run time (median 10.0).' in text
  assert '- 2026-12-04, 3 runs' in text


def test_a_resumed_run_keeps_its_log_and_its_partial_time_is_not_counted(tmp_path,
                                                                          monkeypatch):
  run = le.Run(le.CORE[0], 30, 0)
  (tmp_path / run.name).mkdir()  # the workdir of a killed run
  (tmp_path / f'{run.name}.log').write_text('before the kill\n')
  monkeypatch.setattr(le, '_command', lambda *_: ['python', '-c', 'print("resumed")'])
  seconds, resumed = le._execute(run, tmp_path, '', None)  # pylint: disable=protected-access
  assert resumed and seconds > 0
  assert (tmp_path / f'{run.name}.log').read_text() == 'before the kill\nresumed\n'
  assert (tmp_path / f'{run.name}.seconds').read_text().split()[1] == 'resumed'
  fresh = le.Run(le.CORE[0], 30, 1)
  assert le._execute(fresh, tmp_path, '', None)[1] is False  # pylint: disable=protected-access
  store = {'a': _entry('supervised', 30, 0, {2000: 0.2}),
           'b': _entry('supervised', 30, 1, {2000: 0.3}, minutes=3.0, resumed=True)}
  lines = le.report(store, 1, 'store.json')[0]
  assert ('- 2026-12-03, 2 runs: `cmd`, here; 10 min of run time (median 10.0) (1 resumed run '
          'left out: only its last part was timed).') in lines


def test_stored_runs_are_not_redone_unless_their_workdir_is_here(tmp_path):
  runs = [le.Run(le.CORE[0], 30, s) for s in range(3)]
  store = {runs[0].name: {}, runs[1].name: {}}
  (tmp_path / runs[1].name).mkdir()  # a workdir without a finished result
  assert le.pending(runs, store, tmp_path) == [runs[2]]


def test_store_round_trip_and_bad_store(tmp_path):
  path = tmp_path / 'store.json'
  assert le.load_store(path) == {}
  store = {'b': _entry('supervised', 30, 1, {10: 0.5}), 'a': _entry('supervised', 30, 0, {})}
  le._save_store(path, store)
  assert le.load_store(path) == store
  assert list(json.loads(path.read_text())['runs']) == ['a', 'b']
  assert not list(tmp_path.glob('*.partial'))
  path.write_text('{"not runs": 1}')
  with pytest.raises(SystemExit, match='store.json is not a label-efficiency store'):
    le.load_store(path)


def test_the_committed_results_file_is_the_committed_stores():
  """benchmarks/results/label_efficiency.md is what the benchmark makes of the stored runs."""
  out = _PATH.parent / 'results' / 'label_efficiency'
  lines, *_ = le.report(le.load_store(out.with_suffix('.json')), 2, 'label_efficiency.json')
  assert out.with_suffix('.md').read_text() == '\n'.join(lines)


def test_all_labels_column_and_pretraining_length_table():
  store = {}
  for seed in range(3):
    store[f'supervised_l30_s{seed}'] = _entry('supervised', 30, seed, {2000: 0.2 + seed / 100})
    store[f'supervised_all_l0_s{seed}'] = _entry('supervised_all', 0, seed, {2000: 0.5})
    store[f'supervised_pretrain_l0_s{seed}'] = _entry('supervised_pretrain', 0, seed,
                                                      {2000: 0.55})
    store[f'supervised_rerun_l0_s{seed}'] = _entry('supervised_rerun', 0, seed, {2000: 0.52})
  store['supervised_rerun_l30_s0'] = _entry('supervised_rerun', 30, 0, {2000: 0.22})
  probe = {'within_class_cosine': 0.5, 'between_class_cosine': 0.1, 'cosine_gap': 0.4}
  store['supervised_pretrain_l30_s0'] = _entry('supervised_pretrain', 30, 0, {2000: 0.3},
                                               probe={'pretrain': probe})
  store['supervised_pretrain_p5000_l30_s0'] = _entry(
      'supervised_pretrain_p5000', 30, 0, {2000: 0.35},
      probe={'pretrain': {k: v / 2 for k, v in probe.items()}})
  lines, scores, methods, budgets = le.report(store, 1, 'store.json')
  text = '\n'.join(lines)
  assert budgets == [30] and scores['supervised', 0] == {0: 0.5, 1: 0.5, 2: 0.5}
  assert '| method | 30 labels | all 2,000 labels |' in text
  assert '| Supervised | 21.0 (20.0-22.0) | 50.0 (50.0-50.0) |' in text
  assert '| Supervised, within-image pretraining | 30.0 (1 seed) | 55.0 (55.0-55.0) |' in text
  # Pretraining pairs with supervised training run beside it, which pairs with the older row.
  rerun = 'Supervised, run beside the pretraining rows'
  assert (f'- Supervised, within-image pretraining - {rerun}, all 2,000 labels: '
          '+3.0, +3.0, +3.0 (mean +3.0)') in text
  assert f'- {rerun} - Supervised, all 2,000 labels: +2.0, +2.0, +2.0 (mean +2.0)' in text
  # The longer pretraining has its own table, not a row of the main one; its 0 steps are the
  # supervised run beside it.
  assert 'pretraining steps |' not in text.split('Per-seed')[0]
  assert '| 0 | 22.0 |  |  |  |' in text
  assert '| 2,000 | 30.0 | 0.500 | 0.100 | 0.400 |' in text  # the toy's default length
  assert '| 5,000 | 35.0 | 0.250 | 0.050 | 0.200 |' in text


def test_parts_select_budgets_seeds_and_all_labels():
  runs = le.grid(['pretrain', 'pretrain_length', 'pseudo_label', 'all'], [30, 100], [0, 1])
  names = [r.name for r in runs]
  assert {n for n in names if n.startswith('supervised_pretrain_l')} == {
      f'supervised_pretrain_l{b}_s{s}' for b in (30, 100, 0) for s in (0, 1)}
  # Supervised training again beside them, at every budget, before them.
  assert {n for n in names if n.startswith('supervised_rerun')} == {
      f'supervised_rerun_l{b}_s{s}' for b in (30, 100, 0) for s in (0, 1)}
  assert names.index('supervised_rerun_l30_s0') < names.index('supervised_pretrain_l30_s0')
  assert len(names) == len(set(names))  # the toy's default run is in both pretraining parts
  assert [n for n in names if 'pretrain_p' in n] == [
      'supervised_pretrain_p500_l30_s0', 'supervised_pretrain_p5000_l30_s0']
  assert {n for n in names if n.startswith('pseudo')} == {
      'pseudo_label_l30_s0', 'pseudo_label_l30_s1',
      'pseudo_label_pretrain_l30_s0', 'pseudo_label_pretrain_l30_s1'}
  assert names[-2:] == ['supervised_all_l0_s0', 'supervised_all_l0_s1']
