"""Dagster asset definitions: thin glue that runs the library's stages as assets."""
