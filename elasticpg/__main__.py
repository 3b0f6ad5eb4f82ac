"""`python -m elasticpg <command>`: the same as the `elasticpg` command."""

import sys

from .cli.main import main

sys.exit(main())
