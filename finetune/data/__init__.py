"""Training data: rows read into conversations (rows.py), tokens and trained-token labels
(tokenize.py, templates/), the prepared-data store (store.py) and the audit. It never imports
plan, runs, train, export, evaluate, the lifecycle or the CLI, and never torch."""
