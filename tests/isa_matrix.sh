#!/usr/bin/env bash
# Runs the numeric tests under several CPU instruction sets and reports how close each test
# family comes to its tolerances. Not part of CI: run it by hand on a machine you suspect.
#
#   tests/isa_matrix.sh                      # the numeric modules, every setting
#   tests/isa_matrix.sh tests/               # the whole suite
#   SETTINGS="default sse4_2" tests/isa_matrix.sh tests/test_steps.py
#
# A setting caps the vector instructions of both kernel libraries the suite runs on:
#   XLA's CPU code (JAX)            --xla_cpu_max_isa in XLA_FLAGS
#   oneDNN (PyTorch, TensorFlow)    ONEDNN_MAX_CPU_ISA
# default: what the CPU has (AVX-512 or AVX2, with FMA); avx2: AVX2 with FMA; avx: 256-bit
# vectors without FMA (every multiply-add rounds twice); sse4_2: 128-bit vectors, other
# reduction orders. A cap above what the CPU has changes nothing.
#
# Under each setting it then runs two deliberately wrong variants, which must fail:
#   RECO_JAX_WRONG_REDUCTION=sum|drop  tests/test_parallel_equivalence.py (a device mean
#                                      summed, a device's share lost)
#   RECO_JAX_GOLDEN_CHANGE=grey        tests/test_golden_steps.py, the cases with mixed images
#                                      (BT.709 grey weights)
#
# Every comparison writes observed difference / tolerance to a log (RECO_JAX_TOLERANCE_LOG,
# see tests/tolerances.py); the summary gives the worst ratio per test module and setting.
# A ratio above 1 is a failure; the wrong variants' ratios show how far a bug lands.
# Output and logs go to $OUT (default: a new temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
SETTINGS="${SETTINGS:-default avx2 avx sse4_2}"
WORKERS="${WORKERS:-auto}"
if [ "$#" -eq 0 ]; then
  set -- tests/test_parallel_equivalence.py tests/test_golden_steps.py tests/test_steps.py \
    tests/test_s4gan.py tests/test_reco_loss.py tests/test_reco_bank.py \
    tests/test_pixel_contrast.py tests/test_pretraining.py tests/test_models.py \
    tests/test_convert.py tests/test_photometric.py tests/test_augment.py tests/test_rescale.py \
    tests/test_segmentation_losses.py tests/test_state.py tests/test_train.py \
    tests/test_tools.py tests/test_pipeline.py
fi

flags_for() {
  case "$1" in
    default) echo "|" ;;
    avx2) echo "--xla_cpu_max_isa=AVX2|AVX2" ;;
    avx) echo "--xla_cpu_max_isa=AVX|AVX" ;;
    sse4_2) echo "--xla_cpu_max_isa=SSE4_2|SSE41" ;;
    *) echo "unknown setting '$1': use default, avx2, avx or sse4_2" >&2; exit 2 ;;
  esac
}

run() {  # run NAME SETTING [ENV=VALUE...] -- PYTEST ARGS: logs to $OUT/NAME.{log,jsonl}
  local name="$1" setting="$2" flags xla onednn; shift 2
  flags="$(flags_for "$setting")" || exit 2
  xla="${flags%%|*}"; onednn="${flags##*|}"
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local start=$SECONDS
  env XLA_FLAGS="${XLA_FLAGS:-} $xla" ${onednn:+ONEDNN_MAX_CPU_ISA=$onednn} \
    RECO_JAX_TOLERANCE_LOG="$OUT/$name.jsonl" "${envs[@]}" \
    python -m pytest -q -p no:cacheprovider "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s $(grep -E "(passed|failed|error)" "$OUT/$name.log" | tail -1)" | tee -a "$OUT/runs.txt"
}

: > "$OUT/runs.txt"
for setting in $SETTINGS; do
  run "suite-$setting" "$setting" -- -n "$WORKERS" "$@"
  for wrong in sum drop; do
    run "wrong-$wrong-$setting" "$setting" RECO_JAX_WRONG_REDUCTION=$wrong -- \
      -n "$WORKERS" tests/test_parallel_equivalence.py -k 'agree or per_device_loss'
  done
  run "golden-grey-$setting" "$setting" RECO_JAX_GOLDEN_CHANGE=grey -- \
    -n "$WORKERS" tests/test_golden_steps.py -k 'reproduces and (cutout or cutmix or classmix)'
done

python - "$OUT" $SETTINGS <<'EOF'
"""Summary: worst ratio per test module for each run; whether each wrong variant failed."""
import collections, json, pathlib, re, sys
out, settings = pathlib.Path(sys.argv[1]), sys.argv[2:]
runs = {}
for line in (out / 'runs.txt').read_text().splitlines():
  name, rc, *_ = line.split()
  runs[name] = int(rc.split('=')[1]), line
worst = collections.defaultdict(dict)
for setting in settings:
  for kind in ('suite', 'wrong-sum', 'wrong-drop', 'golden-grey'):
    path = out / f'{kind}-{setting}.jsonl'
    for line in path.read_text().splitlines() if path.exists() else []:
      d = json.loads(line)
      module = d['test'].split('::')[0].split('/')[-1]
      key = (kind, module)
      worst[key][setting] = max(worst[key].get(setting, 0.0), d['ratio'])
print(f'\nworst observed difference / tolerance (above 1 fails); logs in {out}')
print(f"{'run':12} {'module':34} " + ' '.join(f'{s:>9}' for s in settings))
for (kind, module), by in sorted(worst.items()):
  print(f'{kind:12} {module:34} ' + ' '.join(f'{by.get(s, float("nan")):9.3g}' for s in settings))
print()
ok = True
for setting in settings:
  rc, line = runs[f'suite-{setting}']
  ok &= rc == 0
  print(f'{setting:8} suite: {"passed" if rc == 0 else "FAILED"} ({line.split(" ", 2)[2]})')
  for kind in ('wrong-sum', 'wrong-drop', 'golden-grey'):
    rc, line = runs[f'{kind}-{setting}']
    log = (out / f'{kind}-{setting}.log').read_text()
    failed = len(re.findall(r'^FAILED ', log, re.M))
    expected = rc == 1 and failed > 0 and 'passed' not in log.splitlines()[-1]
    ok &= expected
    print(f'{setting:8} {kind}: {failed} failed, as it must' if expected else
          f'{setting:8} {kind}: NOT caught (rc {rc}): {log.splitlines()[-1]}')
sys.exit(0 if ok else 1)
EOF
