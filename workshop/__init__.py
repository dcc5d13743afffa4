"""The workshop's shared package: every stage script runs ``python -m workshop train`` from here."""
