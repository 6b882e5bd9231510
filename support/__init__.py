"""Helpers every stage shares, below all of them: typed configs from TOML and flags (`configs`),
device choice (`devices`) and progress lines for steps that have no bar (`progress`).

Nothing here imports a stage, the API or the command line; they all import it.
"""
