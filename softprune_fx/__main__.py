"""``python -m softprune_fx`` is the ``softprune-fx`` command."""
from .cli import main

raise SystemExit(main())
