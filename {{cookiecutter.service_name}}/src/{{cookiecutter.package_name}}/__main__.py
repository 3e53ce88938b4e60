"""`python -m {{ cookiecutter.package_name }}` is the same as the `{{ cookiecutter.service_name }}` command."""

import sys

from .runtime.cli import main

sys.exit(main())
