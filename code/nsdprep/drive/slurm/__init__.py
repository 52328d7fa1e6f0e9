"""``BACKEND=slurm``: a target's ``datalad run`` steps as one SLURM job array (FAIRly-big workflow).

``make 3mm BACKEND=slurm`` plans exactly the steps a local run plans (:func:`nsdprep.drive.steps.steps_for`;
3 mm: one per subject) and checks each as a local run would (leftovers, dirty dataset, "up to date",
changed inputs need ``FORCE=1``). The steps that have to run become one ``sbatch --array`` job, one
task per step, plus a finishing job that starts when every task has ended (``afterany``):

* **submit** (:mod:`.submit`, under the dataset's lock): publish the dataset to the output store,
  a RIA store (:func:`nsdprep.drive.publish.publish`: history of the dataset and of its input subdatasets,
  derivative content), write the plan and the two job scripts into ``.git/nsdprep-slurm/<submission>/``, submit.
* **each task** (:mod:`.task`, on a compute node): a temporary clone from the store in job-local
  scratch (``SCRATCH``, else ``$TMPDIR``, else ``/tmp``), declared dead (it never counts as a copy), a
  job branch at the submitted commit, the input subdatasets installed without content, the step's
  inputs fetched (from their web URLs, or the store for derivatives), the very same ``datalad run``
  command and message as a local run (same input fingerprint), the new content pushed to the store's
  storage remote, the branch pushed to the store under an ``flock``, the inputs dropped, the clone
  removed. A failing step pushes nothing.
* **finishing job** (:mod:`.finish`): in the user's dataset, under its lock, fetch the job branches,
  octopus-merge them into the branch that was checked out at submission, check the content in the
  store (``git annex fsck --fast --from <storage>``, which also records where it is), get it (a local
  run leaves the outputs here too), push the merged history to the store, delete the job branches,
  and write a report: every step with its node and times; every failed step with its SLURM state, its
  error and the last lines of its log; and the command that resubmits only the failed steps.

The records are ordinary ``[DATALAD RUNCMD]`` commits, so ``datalad rerun`` of one works anywhere,
and the next ``make <target>`` (local or SLURM) finds them "up to date". Resubmitting the same make
command submits only what is missing. A submission whose finishing job never completed (cancelled,
dataset dirty or on another branch at that time) is finished by the next submission first.

Needs ``sbatch``/``squeue``/``scontrol`` (no accounting, no ``sacct``), the dataset and the store on
a file system that the compute nodes share, and datalad + git-annex on the nodes' ``PATH`` (``sbatch
--export=ALL`` passes the submitting environment on).
"""
