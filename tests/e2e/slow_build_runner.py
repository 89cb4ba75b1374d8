"""runner.py whose building of prepared data takes FINETUNE_SLOW_BUILD seconds longer (in the
process that builds): how test_torchrun.py makes a build outlast the collective timeout."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finetune.cli.commands import main  # noqa: E402
from finetune.data import store  # noqa: E402

build = store._build


def slow_build(*args):
    time.sleep(float(os.environ["FINETUNE_SLOW_BUILD"]))
    return build(*args)


if __name__ == "__main__":
    store._build = slow_build
    sys.exit(main(sys.argv[1:]))
