"""Which catalog source a config asks for: the one place that knows every kind."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from .file import FileSource
from .source import CatalogSource


def source_for(config: Config, catalog: Path | None) -> CatalogSource:
    """The source to serve from: the catalog file ``catalog`` (the command line's choice, or
    the config's ``catalog.file``), else the config's Consul cluster."""
    if catalog is not None:
        return FileSource(config, catalog, follow_config=catalog == config.catalog_path())
    if config.catalog.consul is not None:
        from .consul.source import ConsulCatalogSource  # aiohttp's client: only when used

        return ConsulCatalogSource(config)
    raise ConfigError(["catalog: the config names no catalog file and no Consul cluster"])


__all__ = ["source_for"]
