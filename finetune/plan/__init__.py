"""Everything decided and predicted before launch: what the engine will run (engine.py: checkpointing,
optimizer, packing, padding-free, adapter dtype, read by the trainer too), the job (job.py: data,
schedule, budget, disk), the data plan (data_plan.py), the LR schedule, memory and time (budget.py),
the constants and the devices they assume, disk, several GPUs, calibration against measurements,
trackers, and the preflight checks. Pure; it never imports runs, train, export, evaluate, the
lifecycle or the CLI, and never torch (device_speed.py measures in a child process)."""
