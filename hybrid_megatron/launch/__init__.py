"""Launchers: Slurm jobs rendered from templates (training with requeue, conversion / eval
chains, eval sweeps as job arrays) and torchrun on one machine.

Modules: `options` (cluster options and the profile file), `render` (sbatch scripts from the
Jinja templates in `templates/`), `plan` (validated jobs of one request), `submit` (sbatch),
`local` (torchrun), `status` (the hand-off file between a training run and its job script),
the `hybrid-megatron launch` subcommands are in `hybrid_megatron.commands.launch`.
"""
