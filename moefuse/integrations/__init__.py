"""Integrations with other merging tools. Each submodule imports its peer package only when used."""
