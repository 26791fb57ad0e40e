"""`RecipeError`: a recipe key with a wrong value, an unknown key, or a layout that cannot run (the CLI prints
it as one line naming the key). Its own module so that every recipe section (recipe.py, rl.py) can raise it."""

from glm45_train.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe key with a wrong value, an unknown key, or a layout that cannot run."""
