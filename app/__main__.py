"""``python -m app`` starts the service, as ``cnnserve serve`` does."""

import sys

from app.cli import main

main(sys.argv[1:] or ["serve"])
