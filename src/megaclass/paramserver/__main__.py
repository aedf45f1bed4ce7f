"""``python -m megaclass.paramserver serve --rows C --dim D --shard i/N --data-dir DIR --port P``."""

from megaclass.paramserver.server import main

raise SystemExit(main())
