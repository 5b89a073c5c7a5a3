"""SLURM submission of any recipe: the sbatch template, its rank shim and `xomni submit`."""
