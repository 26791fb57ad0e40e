"""`glm45-train eval`: models × prompt sets × thinking modes → scored responses, a summary table and a plot.

models.py resolves what is evaluated (exports, runs exported on the fly, served URLs); sets.py loads the prompt
sets and their scorers (the RL rewards); engines.py opens vLLM or transformers on a model; responses.py turns
completions into scored rows; summary.py aggregates, prints and plots them; run.py drives the whole job.
"""
