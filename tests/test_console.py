"""The console lines a training run prints for people."""
import io

from reco_jax import console as console_lib


def test_duration_is_short_and_readable():
  assert [console_lib.duration(s) for s in (0, 42.4, 307, 3720, -5)] == [
      '0s', '42s', '5m07s', '1h02m', '0s']


def test_train_and_evaluation_lines():
  out = io.StringIO()
  console = console_lib.Console(1500, ['sup_loss', 'unsup_loss', 'reco_loss'], stream=out)
  console.train(50, {'loss': 5.0, 'sup_loss': 1.0, 'unsup_loss': 0.0, 'reco_loss': 4.0,
                     'grad_norm': 3.0}, 2.0)
  console.evaluation(500, 0.25)
  console.evaluation(1000, 0.2)
  assert out.getvalue().splitlines() == [
      'step   50/1500  loss 5.0000 (sup 1.0000, unsup 0.0000, reco 4.0000)  2.00 steps/s  '
      'ETA 12m05s',
      'step  500/1500  eval mIoU 0.2500  (best 0.2500 at step 500)',
      'step 1000/1500  eval mIoU 0.2000  (best 0.2500 at step 500)']


def test_other_processes_print_nothing():
  out = io.StringIO()
  console = console_lib.Console(10, enabled=False, stream=out)
  console.say('hello')
  console.evaluation(10, 0.5)
  assert out.getvalue() == '' and console.best == (0.5, 10)
