"""`python -m automem_jax.report WORKDIR`: writes WORKDIR/report/index.md."""
import logging
import sys

from automem_jax.report import main

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sys.exit(main())
