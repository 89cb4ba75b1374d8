"""The run folder and what it holds: creation, locks and redaction (run_folder.py), how a run came
out (outcome.py), where a resume continues (resume.py), report.md and the plots. It never imports
train, export, evaluate, the lifecycle or the CLI, and never torch."""
