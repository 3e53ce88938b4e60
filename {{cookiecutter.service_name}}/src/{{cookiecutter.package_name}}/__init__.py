{{ cookiecutter.description | tojson }}

SERVICE_NAME = "{{ cookiecutter.service_name }}"
