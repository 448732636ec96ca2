"""``python -m convert``."""

import sys

from convert.cli import main
from flexattn_jax.logs import configure_logging

try:
    configure_logging()  # level: ${FLEXATTN_JAX_LOG}
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
sys.exit(main())
