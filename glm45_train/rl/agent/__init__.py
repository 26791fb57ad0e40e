"""Agentic RL: multi-turn rollouts in which the policy calls tools (environment.py's protocol, episodes.py's loop)."""
