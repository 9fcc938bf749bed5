"""Cluster launchers (installed as `nopetrain.launch`): `slurm` writes sbatch files; `torchrun.sh` runs one node."""
