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
then prints the tables of `python eval.py summarize OUTPUT` (with --paper for real base-to-novel runs: our
numbers beside the paper's). Runs whose results.json says "complete": true are skipped, so the same command
resumes; incomplete runs (killed, crashed) are redone.

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

Unknown dataset keys or calibrations are refused before anything runs. A dataset is present when its
folder (data.py's table, README section "Datasets") is in DATA; missing ones are listed at the start and
the end and skipped, and the exit status is then 1. When DATASETS was not given and none of the default
datasets is present, run.sh falls back to the demo world (`python demo.py prepare`: synthetic datasets and
the shipped tiny CLIP, seconds on a laptop CPU): datasets demo_shapes demo_colours demo_patterns, output
under OUTPUT/demo. Its numbers are not the paper's. DATASETS of demo keys runs just those in the demo world;
DATASETS of real keys of which none is present is an error.

Each run folder is locked while its run trains (RUN_DIR/.lock), so two run.sh (or --dry-run lines) on one
OUTPUT train every run once: a run locked by another process is skipped and reported.

Exit status: 0 every run complete or being run by another process; 1 a run failed, a requested dataset
was missing, or the summary failed; 2 usage error.

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

# A run is finished only when its results.json (written last, atomically) says so.
is_complete() { [[ -f $1 ]] && grep -Eq '"complete"[[:space:]]*:[[:space:]]*true' "$1"; }

# The run folder's lock: an flock(2) on RUN_DIR/.lock through file descriptor 9, taken without waiting. The
# method script inherits the descriptor (RUN_LOCK_FD=9 tells it so), and the kernel drops the lock only when
# the last process holding it ends, so a second run.sh (or a rerun after kill -9 of this one) skips a run
# that is still training. lock_line is the same step as one line of shell, for --dry-run.
lock_py='import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)'
lock_run() { exec 9>>"$1/.lock" && "$PYTHON" -c "$lock_py" 2>/dev/null; }
unlock_run() { exec 9>&-; }

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
requested=$(echo ${DATASETS:-})  # trimmed; empty: the protocol's default datasets, the demo world as fallback
DATA=${DATA:-./data} SEEDS=${SEEDS:-1 2 3} SHOTS=${SHOTS:-16} BACKBONE=${BACKBONE:-ViT-B/16}
OUTPUT=${OUTPUT:-./output} EPOCHS=${EPOCHS:-} CALIBS=${CALIBS:-none ours} DEMO_EPOCHS=${DEMO_EPOCHS:-20}
for n in $SEEDS; do [[ $n =~ ^[0-9]+$ ]] || die "seeds must be whole numbers >= 0, got '$n'"; done
for n in $SHOTS $EPOCHS $DEMO_EPOCHS; do
  [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "shots and epochs must be whole numbers >= 1, got '$n'"
done
[[ -n ${CALIBS// /} && -n ${SEEDS// /} ]] || die "SEEDS and CALIBS must not be empty"
# zeroshot.py trains nothing, so calibrations do not apply: it always writes under calib "none".
if [[ $method == zeroshot && $CALIBS != none ]]; then say "zeroshot: no training, running calib none only"; CALIBS=none; fi

# Runs happen in the repository (methods/, eval.py, demo.py); make the user's relative paths absolute
# first so that they keep their meaning, and so that --dry-run lines work from anywhere.
DATA=$(abspath "$DATA") OUTPUT=$(abspath "$OUTPUT")
if [[ -e $BACKBONE ]]; then BACKBONE=$(abspath "$BACKBONE"); fi
if [[ $PYTHON == */* ]]; then PYTHON=$(abspath "$PYTHON"); fi
cd "$here"

# ---- datasets, calibrations and protocol checked before anything runs (eval.py plan: data.py's table
# gives each dataset's folder under DATA); then which datasets are here ----
table=$("$PYTHON" eval.py plan --datasets "$requested" --calibs "$CALIBS" --protocol "$PROTOCOL") || exit 2
present=() missing="" looked="" all_demo=1
while read -r d folder; do
  if [[ -d $DATA/$folder ]]; then present+=("$d"); else missing="$missing $d" looked="$looked $folder/"; fi
  [[ $d == demo_* ]] || all_demo=0
done <<<"$table"
demo=0
if [[ -n $requested ]] && ((all_demo)); then
  present=($requested) missing=""  # demo datasets asked for by name: the demo world, narrowed to them
elif ((${#present[@]} == 0)); then
  [[ -z $requested ]] ||
    { echo "run.sh: error: none of the requested datasets is under $DATA (looked for:$looked); prepare them as in README.md section \"Datasets\" or pass --data DIR" >&2; exit 1; }
  say "No dataset found under $DATA (looked for:$looked)."
  say "To use the real datasets, prepare them as in README.md section \"Datasets\" and pass --data DIR."
  if ((!demo_ok)); then echo "run.sh: error: no dataset under $DATA and --no-demo; prepare the datasets or pass --data DIR" >&2; exit 1; fi
  present=(demo_shapes demo_colours demo_patterns) missing=""
fi
if [[ ${present[0]:-} == demo_* ]]; then
  [[ $PROTOCOL == base2new ]] || { echo "run.sh: error: the demo world has only --protocol base2new; drop --protocol $PROTOCOL" >&2; exit 1; }
  say "Falling back to the DEMO WORLD (synthetic data, tiny CLIP): $PYTHON demo.py prepare ..."
  unset DEMO_ROOT DEMO_BACKBONE
  prep=$("$PYTHON" demo.py prepare) || { echo "run.sh: error: $PYTHON demo.py prepare failed" >&2; exit 1; }
  eval "$prep"  # sets DEMO_ROOT and DEMO_BACKBONE (see `python demo.py --help`)
  [[ -d ${DEMO_ROOT:-} && -e ${DEMO_BACKBONE:-} ]] ||
    { echo "run.sh: error: demo.py prepare gave no usable DEMO_ROOT/DEMO_BACKBONE:" >&2; echo "$prep" >&2; exit 1; }
  demo=1 DATA=$DEMO_ROOT BACKBONE=$DEMO_BACKBONE OUTPUT=$OUTPUT/demo EPOCHS=${EPOCHS:-$DEMO_EPOCHS}
fi
[[ -z $missing ]] || warn "requested datasets missing under $DATA (skipped; exit status will be 1):$missing"

# ---- the runs: datasets x seeds x calibrations ----
runs=()
for d in "${present[@]}"; do for s in $SEEDS; do for c in $CALIBS; do runs+=("$d $c $s"); done; done; done
total=${#runs[@]}
say "run.sh: $method, protocol $PROTOCOL, $total runs (datasets: ${present[*]}; seeds: $SEEDS; calibs: $CALIBS)"
say "        data $DATA, backbone $BACKBONE, epochs ${EPOCHS:-recipe}, output $OUTPUT"

i=0 n_done=0 n_skipped=0 n_busy=0 failed=()
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
    # One self-contained line: lock the folder (or skip, exit 75), skip if finished meanwhile, run.
    q_dir=$(printf %q "$run_dir") q_res=$(printf %q "$res")
    echo "cd $(printf %q "$here") && mkdir -p $q_dir && exec 9>>$q_dir/.lock && { $(printf %q "$PYTHON") -c $(printf %q "$lock_py") 2>/dev/null || { echo \"skipped: $q_dir is locked by another process\" >&2; exit 75; }; } && { ! grep -Eq '\"complete\"[[:space:]]*:[[:space:]]*true' $q_res 2>/dev/null || exit 0; } && RUN_LOCK_FD=9 $(printf '%q ' "${cmd[@]}")> $(printf %q "$log") 2>&1"
  else
    note=""; if [[ -e $log || -e $res ]]; then note=" (redoing incomplete run)"; fi
    mkdir -p "$run_dir"
    if ! lock_run "$run_dir"; then
      unlock_run
      n_busy=$((n_busy + 1))
      say "$label ... skipped (another process is running it)"
      continue
    fi
    if is_complete "$res"; then  # finished by another process since the check above
      unlock_run
      n_skipped=$((n_skipped + 1))
      say "$label ... skipped (done)"
      continue
    fi
    rm -f "$res"  # under the lock: an incomplete result must not outlive a failed retry
    printf '%s%s ... ' "$label" "$note"
    start=$SECONDS rc=0
    RUN_LOCK_FD=9 "${cmd[@]}" >"$log" 2>&1 || rc=$?
    unlock_run
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
# Real base-to-novel runs are also set beside the paper's published tables; the demo world's are not its datasets.
summarize=(eval.py summarize "$OUTPUT")
if ((!demo)) && [[ $PROTOCOL == base2new ]]; then summarize+=(--paper); fi
echo "==== Summary: $PYTHON ${summarize[*]}"
sum_rc=0
"$PYTHON" "${summarize[@]}" || sum_rc=$?
if ((demo)); then echo "==== $banner ===="; fi
echo
echo "run.sh: $total runs: $n_done done, $n_skipped skipped (already complete), $n_busy skipped (being run by another process), ${#failed[@]} failed"
if ((n_busy)); then echo "Runs being trained by another process are not in the tables yet: rerun this command when they finish."; fi
if ((${#failed[@]})); then
  status=1
  echo "Failed runs (log files):"
  printf '  %s\n' "${failed[@]}"
fi
if [[ -n $missing ]]; then echo "Missing datasets (no folder under $DATA, not run):$missing"; fi
if ((sum_rc)); then status=1; echo "eval.py summarize failed (exit $sum_rc); the results are in $OUTPUT"; fi
exit $status
