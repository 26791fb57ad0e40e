"""Processes: process groups and Megatron parallel state (distributed.py); the one module adapting Megatron-Core
to CPU (cpu.py)."""
