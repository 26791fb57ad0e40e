"""The cluster side: will a recipe fit (`plan`: model_parts, activations, plan, report) and its Slurm job (slurm)."""
