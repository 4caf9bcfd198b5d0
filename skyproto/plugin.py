"""Plugin objects for twistd, kept light: scanning plugins must not import the daemons."""

from __future__ import annotations

import importlib
from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python.usage import Options
from zope.interface import implementer


@implementer(IPlugin, IServiceMaker)
class LazyServiceMaker:
    """An IServiceMaker that imports ``skyproto.tap`` only when its daemon is chosen."""

    def __init__(self, tapname: str, description: str, options: str, make: str) -> None:
        self.tapname = tapname
        self.description = description
        self._options = options
        self._make = make

    @property
    def options(self) -> type[Options]:
        """The daemon's Options class, imported only now (``twistd --help`` stays fast)."""
        cls: type[Options] = getattr(importlib.import_module("skyproto.tap"), self._options)
        return cls

    def makeService(self, options: Any) -> IService:
        """Build the daemon's service from parsed options (importing skyproto.tap only now)."""
        make = getattr(importlib.import_module("skyproto.tap"), self._make)
        service: IService = make(options)
        return service
