"""Recipes: the typed schema with strict loading and key suggestions (recipe.py), parallel layouts (layout.py)."""
