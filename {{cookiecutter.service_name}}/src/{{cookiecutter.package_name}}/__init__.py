"""The {{ cookiecutter.service_name }} service: handlers in handlers.py, see README.md."""

SERVICE_NAME = "{{ cookiecutter.service_name }}"
# The release of cookiecutter-event-service this service was made from or last updated to
# (its CHANGELOG.md says what each release changed); `cruft update` rewrites this line.
TEMPLATE_VERSION = "{{ cookiecutter._template_version }}"
