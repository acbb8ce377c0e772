"""The example chat app: ``flask --app example_app amqp declare`` from the repository root."""

from .app import create_app

__all__ = ["create_app"]
