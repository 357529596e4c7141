"""One module per data source; each registers a builder with ``@register_dataset``."""
