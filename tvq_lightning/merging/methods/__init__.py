"""Built-in merging methods; importing this package registers them."""
from . import breadcrumbs, dare, emr, lines, magmax, simple, tall, ties  # noqa: F401
