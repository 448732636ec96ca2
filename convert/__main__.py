"""``python -m convert``."""

import sys

from convert.cli import main
from flexattn_jax.logs import configure_logging

configure_logging()  # level: ${FLEXATTN_JAX_LOG}
sys.exit(main())
