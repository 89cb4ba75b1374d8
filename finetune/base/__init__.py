"""The base every stage stands on: the user's-mistake exception, atomic files, locks, child
processes, the sandbox that runs model-written code (sandbox.py: eval's answers and GRPO's
sampled completions), content digests, torchrun's collectives, the console, and every private
library API (internals.py). It never imports another finetune subpackage."""
