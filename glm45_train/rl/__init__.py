"""Reinforcement learning (GRPO) for GLM-4.5: prompts, rewards, rollouts and the training loop."""
