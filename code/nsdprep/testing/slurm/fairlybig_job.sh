#!/bin/bash
# One task of a FAIRly-big job array (DataLad handbook pattern): an ephemeral clone (temporary,
# declared dead, removed at exit) from the RIA store in job-local scratch, a job branch, the very
# same `datalad run` as locally, the annexed output pushed to the store's storage sibling, the
# branch pushed to the store's git repository (serialised with flock). A failing command pushes
# nothing.
#
#   sbatch --array=0-N fairlybig_job.sh SOURCE_URL SCRATCH LOCKFILE [FAIL_TASKS]
#
# SOURCE_URL  clone URL of the dataset, e.g. 'ria+file:///store#~alias'
# SCRATCH     folder for the temporary clone ('' = job-local $TMPDIR, else /tmp)
# LOCKFILE    lock file shared by all tasks (serialises `git push` to the store)
# FAIL_TASKS  comma-separated task IDs whose command exits 1 (demonstration of a failing task)
# Environment: HOME (isolated), GIT_AUTHOR_NAME/EMAIL, GIT_COMMITTER_NAME/EMAIL, PATH with
# datalad and git-annex (sbatch exports the submitting environment).
#SBATCH --job-name=fairlybig
#SBATCH --cpus-per-task=1
set -eu -o pipefail

source_url=$1
scratch=${2:-${TMPDIR:-/tmp}}
lock=$3
fail=${4:-}
task=${SLURM_ARRAY_TASK_ID:?run this as an sbatch --array task}
: "${GIT_AUTHOR_NAME:?set a git identity (GIT_AUTHOR_NAME/EMAIL, GIT_COMMITTER_NAME/EMAIL)}"
: "${GIT_COMMITTER_NAME:?set a git identity (GIT_AUTHOR_NAME/EMAIL, GIT_COMMITTER_NAME/EMAIL)}"
branch="job-$task"
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

t0=$(now)
echo "task $task of job ${SLURM_ARRAY_JOB_ID} on $(hostname)"
mkdir -p "$scratch"
clone=$(mktemp -d "$scratch/fairlybig-${SLURM_ARRAY_JOB_ID}_$task.XXXXXX")
# annexed objects are read-only: make them writable before removing the clone
trap 'chmod -R u+w "$clone" 2>/dev/null; rm -rf "$clone"' EXIT
datalad -l error clone "$source_url" "$clone/ds"
cd "$clone/ds"
# The clone is thrown away: never record it as a place that holds content.
git annex dead here
git checkout -q -b "$branch"
t1=$(now)

# datalad run formats the command: {inputs}/{outputs} are placeholders, literal braces are {{ }}.
cmd="mkdir -p out && (cat {inputs}; echo \"result of task $task\") > {outputs}"
if [[ ",$fail," == *",$task,"* ]]; then
    cmd="echo 'task $task fails on purpose' >&2; exit 1"
fi
datalad run -m "Toy result of task $task" -i input.txt -o "out/$task.txt" "$cmd"
t2=$(now)

# git-annex 10.2026x refuses to write to a special remote that a clone enabled automatically
# ("Write prevented due to an unverified special remote"): accept the store's storage remote
# after checking that its configuration points at the store we cloned from.
store=${source_url%%#*}
if git annex verifyremote --help >/dev/null 2>&1; then
    report=$(git annex verifyremote ria-storage </dev/null)
    id=$(sed -n 's/.*verifyremote ria-storage --safe \([^ ]*\).*/\1/p' <<<"$report" | head -n 1)
    if [[ -n $id ]]; then
        fields=$(tr -s ' \t' '\n\n' <<<"$report")
        if ! grep -qxF "url=$store" <<<"$fields"; then
            echo "ria-storage is not the store $store:" >&2
            echo "$report" >&2
            exit 1
        fi
        git annex verifyremote ria-storage --safe "$id"
    fi
fi
# Content first (no lock: each key is a separate object in the store), then the branch.
datalad -l error push --to ria-storage
t3=$(now)
flock "$lock" git push -q origin "$branch"
t4=$(now)
echo "TIMING task=$task clone=$(took "$t0" "$t1") run=$(took "$t1" "$t2")" \
    "push_data=$(took "$t2" "$t3") push_git=$(took "$t3" "$t4") total=$(took "$t0" "$t4")"
