"""Packaging for flask-nucleon-amqp (static metadata; see pyproject.toml for tool settings)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "flask_nucleon_amqp" / "__init__.py").read_text(), re.M)[1]

#: Tools for `make lint`, `make docs` and the packaging test, in extras of their own.
LINT = ["ruff==0.17.6", "mypy==2.4.1"]  # pinned: lint results must not move under us
DOCS = ["sphinx>=7.2"]
BUILD = ["build>=1.0"]
#: The transactional outbox (flask_nucleon_amqp.outbox).
SQLALCHEMY = ["SQLAlchemy>=2.0", "Flask-SQLAlchemy>=3.1"]
TEST = [
    "pytest>=7",
    "pytest-flask>=1.3",
    "pytest-timeout>=2.1",
    "gunicorn>=21",
    "prometheus_client>=0.17",
    *SQLALCHEMY,  # tests/test_outbox.py
    "psycopg[binary]>=3.1",  # PostgreSQL driver for the outbox tests
    "PyMySQL>=1.1",  # MariaDB/MySQL driver for the outbox tests
    "python-dotenv>=1.0",  # `flask amqp ...` reads .flaskenv (the example app) at the root and in example_app/
    "selenium>=4.20",  # tests/test_chat_page.py drives Debian's chromium (make browser installs it)
    "hypothesis>=6.0",  # generated tables in the codec tests
    *DOCS,  # tests/test_docs.py builds the docs
    *BUILD,  # tests/test_packaging.py builds the sdist and the wheel
    # tests/test_tracing.py: the SDK's in-memory exporter, Flask's instrumentation, and pika for interop
    "opentelemetry-api>=1.27",
    "opentelemetry-sdk>=1.27",
    "opentelemetry-instrumentation-flask>=0.48b0",
    "pika>=1.3",
]

setup(
    name="flask-nucleon-amqp",
    version=VERSION,
    description="Pooled, gevent-native AMQP (RabbitMQ) connections for Flask apps, built on puka",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license_expression="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["flask_nucleon_amqp", "flask_nucleon_amqp.*"]),
    package_data={"flask_nucleon_amqp": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "Flask>=3.0",
        "blinker>=1.6.2",
        "click>=8.1.3",
        "puka==0.0.8",
        "gevent>=22.10",
    ],
    extras_require={
        "test": TEST,
        "prometheus": ["prometheus_client>=0.17"],
        "sqlalchemy": SQLALCHEMY,
        "otel": ["opentelemetry-api>=1.27"],
        "bench": ["pika>=1.3", "kombu>=5.3"],
        "lint": LINT,
        "docs": DOCS,
        "build": BUILD,
        "dev": [*TEST, *LINT],
    },
    entry_points={
        # `flask amqp ...` is listed in `flask --help` even before the app is loaded.
        "flask.commands": ["amqp = flask_nucleon_amqp.cli:amqp_cli"],
        # Fixtures for users' own test suites (flask_nucleon_amqp.testing).
        "pytest11": ["flask_nucleon_amqp = flask_nucleon_amqp.testing"],
    },
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: Web Environment",
        "Framework :: Flask",
        "Framework :: Pytest",
        "Intended Audience :: Developers",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: WSGI",
        "Topic :: System :: Networking",
        "Typing :: Typed",
    ],
)
