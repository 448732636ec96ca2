"""``python -m train``."""

import sys

from flexattn_jax.logs import configure_logging
from train.cli import main

configure_logging()  # level: ${FLEXATTN_JAX_LOG}
sys.exit(main())
