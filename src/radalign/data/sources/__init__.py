"""Adapters that read public dataset layouts (archives, XML, CSV) into radalign's text and records."""
