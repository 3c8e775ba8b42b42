"""Foundation shared by every other package: errors, registries, workspace paths, settings.

Imports nothing heavier than the standard library and pydantic, so that any package may use it.
"""
