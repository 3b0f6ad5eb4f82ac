"""`python -m elasticpg.run ...`: the same as `elasticpg run ...` (as `torch.distributed.run`
is to `torchrun`)."""

import sys

from .launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
