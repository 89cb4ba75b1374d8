"""The recipe: its one typed schema (schema.py), reading YAML with extends and overrides
(documents.py), and lineage (copy, diff). It imports base only; it never imports models, data,
plan, runs, train, export, evaluate, the lifecycle or the CLI, and never torch."""
