"""`python -m vitscope` is the `vitscope` command."""

from vitscope.cli import app

app()
