"""The {{ cookiecutter.service_name }} service: handlers in handlers.py, see README.md."""

SERVICE_NAME = "{{ cookiecutter.service_name }}"
