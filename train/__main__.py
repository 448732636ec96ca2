"""``python -m train``."""

import sys

from flexattn_jax.logs import configure_logging
from train.cli import main

try:
    configure_logging()  # level: ${FLEXATTN_JAX_LOG}
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
sys.exit(main())
