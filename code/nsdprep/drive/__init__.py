"""The driving code: plan and run the stages' `datalad run` steps, locally or on SLURM."""
