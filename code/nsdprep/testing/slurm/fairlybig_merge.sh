#!/bin/bash
# Finishing job of a FAIRly-big array: in the user's dataset, fetch the job branches from the RIA
# store, list the tasks that left no branch (failed), octopus-merge the others into the current
# branch, re-establish where the content is (`git annex fsck --fast -f <storage>`: the job clones'
# git-annex branches are never pushed), push the result to the store and delete the job branches.
#
#   sbatch --dependency=afterany:ARRAY_JOB fairlybig_merge.sh DATASET NTASKS [ARRAY_JOB]
#
# Exit status: 0 all tasks merged, 3 some tasks left no branch (the others are merged), else error.
#SBATCH --job-name=fairlybig-merge
set -eu -o pipefail

ds=$1
ntasks=$2
array_job=${3:-}
sibling=${FAIRLYBIG_SIBLING:-ria}
storage=${FAIRLYBIG_STORAGE:-$sibling-storage}
t0=$(date +%s.%N)
cd "$ds"

git fetch -q --prune "$sibling"
branches=()
failed=()
for ((i = 0; i < ntasks; i++)); do
    if git rev-parse -q --verify "refs/remotes/$sibling/job-$i" >/dev/null; then
        branches+=("$sibling/job-$i")
    else
        failed+=("$i")
    fi
done
for i in "${failed[@]}"; do
    state=""
    if [[ -n $array_job ]]; then
        state=$(scontrol -o show job "${array_job}_$i" 2>/dev/null |
            grep -o 'JobState=[A-Z_]* .*ExitCode=[0-9:]*' | sed 's/ .* / /' || true)
    fi
    echo "FAILED task=$i (no branch job-$i in $sibling) ${state}"
done
if ((${#branches[@]} == 0)); then
    echo "nothing to merge" >&2
    exit 3
fi

git merge -q --no-ff --no-edit -m "Merge results of ${#branches[@]} job(s)${array_job:+ of SLURM job $array_job}" \
    "${branches[@]}"
# The job clones declared themselves dead and pushed no git-annex branch: ask the store.
git annex fsck --fast --quiet -f "$storage"
datalad -l error push --to "$sibling"
git push -q "$sibling" --delete "${branches[@]#"$sibling/"}"
git fetch -q --prune "$sibling"
t1=$(date +%s.%N)
echo "MERGED branches=${#branches[@]} failed=${#failed[@]} seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
((${#failed[@]} == 0)) || exit 3
