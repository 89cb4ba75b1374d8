"""The models a recipe names: the base model's config and identity without a download (base.py),
shapes and exact parameter counts from config.json (shapes.py, configs/), and the tiny Llama 3
for the demo and tests (tiny_model.py). It never imports data, plan, runs, train, export, evaluate,
the lifecycle or the CLI."""
