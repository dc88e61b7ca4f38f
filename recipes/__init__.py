"""The built-in recipes, installed as ``mixerdistill.recipes`` (``mixerdistill run NAME`` finds them by name)."""
