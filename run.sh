#!/usr/bin/env bash
# Experiment driver: runs methods/METHOD.py once per dataset x seed x calibration, each run in its own
# directory with its own log, resumable, then prints eval.py's summary tables. `bash run.sh --help`.
# Written for bash 3.2 too (macOS): no ${x^^}, no mapfile, empty arrays expanded with ${a[@]+...}.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash run.sh METHOD [options] [-- extra args passed to every method call]

Runs methods/METHOD.py for every dataset x seed x calibration, each into
  OUTPUT/PROTOCOL/METHOD/CALIB/DATASET/seedSEED/  (log.txt = the run's stdout+stderr, results.json, ...)
then prints the tables of `python eval.py summarize OUTPUT`. Runs whose results.json says
"complete": true are skipped, so the same command resumes; incomplete runs (killed, crashed) are redone.

Options (or the environment variable on the right; an option wins over the environment):
  --data DIR           DATA      dataset root (default ./data)
  --datasets "A B .."  DATASETS  dataset keys (default: the 11 base-to-novel datasets
                                 imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101
                                 fgvc_aircraft sun397 dtd eurosat ucf101; with --protocol xd: imagenet)
  --seeds "1 2 3"      SEEDS     seeds (default 1 2 3)
  --calibs "A B .."    CALIBS    calibrations, names as in losses.py (default "none ours")
  --shots K            SHOTS     shots per class (default 16)
  --backbone NAME      BACKBONE  CLIP model name or checkpoint path (default ViT-B/16)
  --output DIR         OUTPUT    output root (default ./output)
  --epochs N           EPOCHS    epochs; empty = the method's own recipe (default empty)
  --protocol P         PROTOCOL  base2new (default) or xd: train on the source (imagenet); the method
                                 script evaluates every target dataset itself
  --dry-run            print one self-contained bash command per pending run, run nothing
  --no-demo            when no dataset is found: fail instead of falling back to the demo world
  -h, --help           this text
Environment only:
  PYTHON       the interpreter (default python)
  DEMO_EPOCHS  epochs in the demo world when EPOCHS is empty (default 20)

A dataset is present when its folder is in DATA: imagenet caltech-101 oxford_pets stanford_cars
oxford_flowers food-101 fgvc_aircraft sun397 dtd eurosat ucf101 (README section "Datasets").
Missing ones are listed at the start and the end and skipped; the exit status is then 1.
When none is present, run.sh falls back to the demo world (`python demo.py prepare`: synthetic datasets
and the shipped tiny CLIP, seconds on a laptop CPU): datasets demo_shapes demo_colours demo_patterns, output
under OUTPUT/demo. Its numbers are not the paper's.

Exit status: 0 every run complete; 1 a run failed, a requested dataset was missing, or the summary
failed; 2 usage error.

Examples:
  bash run.sh coop                                           # none + ours, 11 datasets x 3 seeds
  bash run.sh coop --calibs "none mbls zs_norm penalty mdca ours"     # the full comparison
  DATASETS="dtd eurosat" SEEDS=1 bash run.sh kgcoop -- --precision bf16
  bash run.sh coop --protocol xd                             # cross-dataset, source imagenet
  # GNU parallel, 4 runs at a time, one GPU each ({%} = job slot 1..4); then the tables:
  bash run.sh coop --dry-run | parallel -j 4 'CUDA_VISIBLE_DEVICES=$(({%} - 1)) bash -c {}'
  bash run.sh coop                                           # skips the finished runs, prints tables
  # SLURM array, one run per task (job.sh: #!/bin/bash + the line below):
  bash run.sh coop --dry-run > jobs.txt && sbatch --array=1-$(wc -l < jobs.txt) --gres=gpu:1 job.sh
      bash -c "$(sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt)"
EOF
}

die() { echo "run.sh: error: $*" >&2; exit 2; }
warn() { echo "run.sh: warning: $*" >&2; }
# Messages go to stdout, except in --dry-run where stdout holds only the commands.
say() { if ((dry_run)); then echo "$*" >&2; else echo "$*"; fi; }
abspath() { if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/${1#./}"; fi; }

# Dataset key -> its folder under DATA (README section "Datasets"); demo and other keys: the key itself.
folder_of() {
  case "$1" in
    caltech101) echo caltech-101 ;;          food101) echo food-101 ;;
    imagenet_sketch) echo imagenet-sketch ;; imagenet_a) echo imagenet-adversarial ;;
    imagenet_r) echo imagenet-rendition ;;
    *) echo "$1" ;;
  esac
}

# A run is finished only when its results.json (written last, atomically) says so.
is_complete() { [[ -f $1 ]] && grep -Eq '"complete"[[:space:]]*:[[:space:]]*true' "$1"; }

# ---- command line: options override the environment ----
method="" dry_run=0 demo_ok=1 extra=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --no-demo) demo_ok=0 ;;
    --data | --datasets | --seeds | --calibs | --shots | --backbone | --output | --epochs | --protocol)
      (($# >= 2)) || die "$1 needs a value"
      # --datasets X sets DATASETS=X
      printf -v "$(echo "${1#--}" | tr '[:lower:]' '[:upper:]')" '%s' "$2"
      shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --opt=value -> --opt value
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1 (see bash run.sh --help)" ;;
    *) [[ -z $method ]] || die "one METHOD only, got '$method' and '$1'"; method=$1 ;;
  esac
  shift
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
available=""
for f in "$here"/methods/*.py; do
  name=$(basename "$f" .py)
  [[ ! -e $f || $name == _* ]] || available="$available $name"
done
[[ -n $method ]] || die "no METHOD given (available:${available:- none}); see bash run.sh --help"
[[ -f $here/methods/$method.py ]] || die "no script methods/$method.py (available:${available:- none})"
set -f  # from here on, word lists like $SEEDS are split into words but never globbed

PYTHON=${PYTHON:-python}
PROTOCOL=${PROTOCOL:-base2new}
base2new_datasets="imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101"
case "$PROTOCOL" in
  base2new) DATASETS=${DATASETS:-$base2new_datasets} ;;
  xd) DATASETS=${DATASETS:-imagenet} ;;  # the source; the method script evaluates the targets itself
  *) die "--protocol must be base2new or xd, got '$PROTOCOL'" ;;
esac
DATA=${DATA:-./data} SEEDS=${SEEDS:-1 2 3} SHOTS=${SHOTS:-16} BACKBONE=${BACKBONE:-ViT-B/16}
OUTPUT=${OUTPUT:-./output} EPOCHS=${EPOCHS:-} CALIBS=${CALIBS:-none ours} DEMO_EPOCHS=${DEMO_EPOCHS:-20}
for n in $SEEDS $SHOTS $EPOCHS $DEMO_EPOCHS; do
  [[ $n =~ ^[0-9]+$ ]] || die "seeds, shots and epochs must be whole numbers, got '$n'"
done
[[ -n ${DATASETS// /} && -n ${CALIBS// /} && -n ${SEEDS// /} ]] || die "DATASETS, SEEDS and CALIBS must not be empty"
# zeroshot.py trains nothing, so calibrations do not apply: it always writes under calib "none".
if [[ $method == zeroshot && $CALIBS != none ]]; then say "zeroshot: no training, running calib none only"; CALIBS=none; fi

# Runs happen in the repository (methods/, eval.py, demo.py); make the user's relative paths absolute
# first so that they keep their meaning, and so that --dry-run lines work from anywhere.
DATA=$(abspath "$DATA") OUTPUT=$(abspath "$OUTPUT")
if [[ -e $BACKBONE ]]; then BACKBONE=$(abspath "$BACKBONE"); fi
if [[ $PYTHON == */* ]]; then PYTHON=$(abspath "$PYTHON"); fi
cd "$here"

# ---- which datasets are here; none at all -> the demo world ----
present=() missing=""
for d in $DATASETS; do
  if [[ -d $DATA/$(folder_of "$d") ]]; then present+=("$d"); else missing="$missing $d"; fi
done
demo=0
if ((${#present[@]} == 0)); then
  say "No requested dataset found under $DATA (looked for the folders:$(for d in $DATASETS; do printf ' %s/' "$(folder_of "$d")"; done))."
  say "To use the real datasets, prepare them as in README.md section \"Datasets\" and pass --data DIR."
  if ((!demo_ok)); then echo "run.sh: error: no dataset and --no-demo" >&2; exit 1; fi
  [[ $PROTOCOL == base2new ]] || { echo "run.sh: error: the demo world has only --protocol base2new" >&2; exit 1; }
  say "Falling back to the DEMO WORLD (synthetic data, tiny CLIP): $PYTHON demo.py prepare ..."
  unset DEMO_ROOT DEMO_BACKBONE
  prep=$("$PYTHON" demo.py prepare) || { echo "run.sh: error: $PYTHON demo.py prepare failed" >&2; exit 1; }
  eval "$prep"  # sets DEMO_ROOT and DEMO_BACKBONE (see `python demo.py --help`)
  [[ -d ${DEMO_ROOT:-} && -e ${DEMO_BACKBONE:-} ]] ||
    { echo "run.sh: error: demo.py prepare gave no usable DEMO_ROOT/DEMO_BACKBONE:" >&2; echo "$prep" >&2; exit 1; }
  demo=1 missing="" DATA=$DEMO_ROOT BACKBONE=$DEMO_BACKBONE OUTPUT=$OUTPUT/demo EPOCHS=${EPOCHS:-$DEMO_EPOCHS}
  present=(demo_shapes demo_colours demo_patterns)
fi
[[ -z $missing ]] || warn "requested datasets missing under $DATA (skipped; exit status will be 1):$missing"

# ---- the runs: datasets x seeds x calibrations ----
runs=()
for d in "${present[@]}"; do for s in $SEEDS; do for c in $CALIBS; do runs+=("$d $c $s"); done; done; done
total=${#runs[@]}
say "run.sh: $method, protocol $PROTOCOL, $total runs (datasets: ${present[*]}; seeds: $SEEDS; calibs: $CALIBS)"
say "        data $DATA, backbone $BACKBONE, epochs ${EPOCHS:-recipe}, output $OUTPUT"

i=0 n_done=0 n_skipped=0 failed=()
for r in "${runs[@]}"; do
  read -r d c s <<<"$r"
  i=$((i + 1))
  run_dir=$OUTPUT/$PROTOCOL/$method/$c/$d/seed$s  # the same path the method script computes
  log=$run_dir/log.txt res=$run_dir/results.json
  cmd=("$PYTHON" "methods/$method.py" --dataset "$d" --root "$DATA" --seed "$s" --shots "$SHOTS"
    --calib "$c" --backbone "$BACKBONE" --output "$OUTPUT" --protocol "$PROTOCOL")
  if [[ -n $EPOCHS ]]; then cmd+=(--epochs "$EPOCHS"); fi
  cmd+=(${extra[@]+"${extra[@]}"})
  label="[$i/$total] $method $c $d seed$s"

  if is_complete "$res"; then
    n_skipped=$((n_skipped + 1))
    say "$label ... skipped (done)"
  elif ((dry_run)); then
    echo "cd $(printf %q "$here") && mkdir -p $(printf %q "$run_dir") && $(printf '%q ' "${cmd[@]}")> $(printf %q "$log") 2>&1"
  else
    note=""; if [[ -e $run_dir ]]; then note=" (redoing incomplete run)"; fi
    rm -f "$res"  # an incomplete result must not outlive a failed retry
    mkdir -p "$run_dir"
    printf '%s%s ... ' "$label" "$note"
    start=$SECONDS rc=0
    "${cmd[@]}" >"$log" 2>&1 || rc=$?
    if ((rc == 0)) && is_complete "$res"; then
      n_done=$((n_done + 1))
      echo "done ($((SECONDS - start)) s)"
    else
      why="exit $rc"; if ((rc == 0)); then why="exit 0 but no complete results.json"; fi
      echo "FAILED ($why; see $log)"
      failed+=("$label: $log")
    fi
  fi
done

status=0
if [[ -n $missing ]]; then status=1; fi
if ((dry_run)); then
  [[ -z $missing ]] || warn "requested datasets missing under $DATA (not in the commands):$missing"
  exit $status
fi

# ---- summary tables and the final report ----
banner="DEMO WORLD (synthetic data, tiny CLIP): numbers are not the paper's"
echo
if ((demo)); then echo "==== $banner ===="; fi
echo "==== Summary: $PYTHON eval.py summarize $OUTPUT"
sum_rc=0
"$PYTHON" eval.py summarize "$OUTPUT" || sum_rc=$?
if ((demo)); then echo "==== $banner ===="; fi
echo
echo "run.sh: $total runs: $n_done done, $n_skipped skipped (already complete), ${#failed[@]} failed"
if ((${#failed[@]})); then
  status=1
  echo "Failed runs (log files):"
  printf '  %s\n' "${failed[@]}"
fi
if [[ -n $missing ]]; then echo "Missing datasets (no folder under $DATA, not run):$missing"; fi
if ((sum_rc)); then status=1; echo "eval.py summarize failed (exit $sum_rc); the results are in $OUTPUT"; fi
exit $status
