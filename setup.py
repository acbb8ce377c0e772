"""Packaging for flask-nucleon-amqp (static metadata; see pyproject.toml for tool settings)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "flask_nucleon_amqp" / "__init__.py").read_text(), re.M)[1]

setup(
    name="flask-nucleon-amqp",
    version=VERSION,
    description="Pooled, gevent-native AMQP (RabbitMQ) connections for Flask apps, built on puka",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["flask_nucleon_amqp", "flask_nucleon_amqp.*"]),
    package_data={"flask_nucleon_amqp": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "Flask>=3.0",
        "puka==0.0.8",
        "gevent>=22.10",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-flask>=1.3", "pytest-timeout>=2.1", "gunicorn>=21", "prometheus_client>=0.17"],
        "prometheus": ["prometheus_client>=0.17"],
        "bench": ["pika>=1.3", "kombu>=5.3"],
    },
    entry_points={
        # `flask amqp ...` is listed in `flask --help` even before the app is loaded.
        "flask.commands": ["amqp = flask_nucleon_amqp.cli:amqp_cli"],
        # Fixtures for users' own test suites (flask_nucleon_amqp.testing).
        "pytest11": ["flask_nucleon_amqp = flask_nucleon_amqp.testing"],
    },
    classifiers=[
        "Framework :: Flask",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: System :: Networking",
    ],
)
