"""The hooks: bad answers are refused in one line; unchosen options leave no files."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import TEMPLATE, bake_cli

GOOD = {
    "service_name": "order-service",
    "package_name": "order_service",
    "description": "d",
    "author_name": "Team",
    "author_email": "team@example.com",
    "broker": "kafka",
    "python_version": "3.11",
    "schemas_source": "",
}


def load_hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TEMPLATE / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRE = load_hook("pre_gen_project")
POST = load_hook("post_gen_project")


def test_good_answers_pass() -> None:
    assert PRE.validate(GOOD) is None
    assert (
        PRE.validate({**GOOD, "service_name": "billing-v2", "package_name": "billing_v2"}) is None
    )


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (
            {"service_name": "Order-Service"},
            "service_name 'Order-Service' is not a slug",
        ),
        ({"service_name": "order_service"}, "is not a slug"),
        ({"service_name": "2fast"}, "is not a slug"),
        ({"service_name": "order--service"}, "is not a slug"),
        ({"service_name": "order-service-"}, "is not a slug"),
        ({"service_name": "a" * 64}, "longer than 63 characters"),
        ({"package_name": "2fast"}, "package_name '2fast' is not a Python identifier"),
        ({"package_name": "order-service"}, "is not a Python identifier"),
        ({"package_name": "class"}, "package_name 'class' is a Python keyword"),
        ({"package_name": "match"}, "is a Python keyword"),
        ({"package_name": "json"}, "package_name 'json' would shadow"),
        ({"package_name": "asyncio"}, "would shadow"),
        ({"package_name": "google"}, "would shadow"),
        ({"package_name": "a" * 41}, "longer than 40 characters"),
        ({"description": "two\nlines"}, "description must be a single line"),
        ({"schemas_source": "a\nb"}, "schemas_source must be a single line"),
        ({"author_email": "nobody"}, "author_email 'nobody' is not an e-mail address"),
        ({"author_name": "  "}, "author_name must not be empty"),
    ],
)
def test_bad_answers_are_refused_with_a_reason(answers: dict[str, str], expected: str) -> None:
    problem = PRE.validate({**GOOD, **answers})
    assert problem is not None
    assert expected in problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({"service_name": "Bad Name"}, "error: service_name 'Bad Name' is not a slug"),
        ({"package_name": "json"}, "error: package_name 'json' would shadow"),
    ],
)
def test_cookiecutter_refuses_bad_answers_and_writes_nothing(
    out: Path, answers: dict[str, str], expected: str
) -> None:
    result = bake_cli(out, **answers)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [next(line for line in lines if expected in line)]
    assert list(out.iterdir()) == []


def test_cookiecutter_refuses_an_unknown_choice(out: Path) -> None:
    result = bake_cli(out, broker="nats")
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == (
        "ValueError: nats provided for choice variable broker, "
        "but the choices are ['kafka', 'rabbitmq']."
    )
    assert list(out.iterdir()) == []


def documented_refusals() -> list[tuple[dict[str, str], list[str]]]:
    """docs/options.md's examples: the answers of each `$ cookiecutter` line, and the
    lines shown after it."""
    text = (TEMPLATE / "docs" / "options.md").read_text()
    examples = []
    for block in re.findall(r"^ *```text\n(.*?)^ *```", text, flags=re.MULTILINE | re.DOTALL):
        command, *shown = [line.removeprefix("    ") for line in block.splitlines()]
        words = shlex.split(command.removeprefix("$ "))
        assert words[:3] == ["cookiecutter", "--no-input", "<template>"], command
        examples.append((dict(word.split("=", 1) for word in words[3:]), shown))
    return examples


def headlines(lines: list[str]) -> list[str]:
    """The lines of an output that are not a traceback's frames (those vary)."""
    return [line for line in lines if not line.startswith(" ")]


def test_options_doc_shows_what_cookiecutter_prints_for_a_refused_answer(out: Path) -> None:
    """cookiecutter adds a traceback to every refusal and no template can stop it: the
    doc says so and shows the output, which must stay the output."""
    examples = documented_refusals()
    assert {tuple(answers) for answers, _ in examples} == {("service_name",), ("python_version",)}
    for answers, shown in examples:
        result = bake_cli(out, merged=True, **answers)
        assert result.returncode == 1
        assert headlines(result.stdout.splitlines()) == headlines(shown)
        assert list(out.iterdir()) == []


def test_a_refused_answer_is_the_first_line_the_user_sees(out: Path) -> None:
    result = bake_cli(out, merged=True, service_name="Bad Name")
    first, *rest = result.stdout.splitlines()
    assert first.startswith("error: service_name 'Bad Name' is not a slug")
    assert not any(line.startswith("error: ") for line in rest)


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
def test_post_gen_keeps_only_the_chosen_broker_files(tmp_path: Path, broker: str) -> None:
    def files(name: str) -> list[Path]:
        return [tmp_path / path.format(package="pkg") for path in POST.BROKER_FILES[name]]

    for path in files("kafka") + files("rabbitmq"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    POST.prune(tmp_path, broker, "pkg")
    other = next(name for name in POST.BROKER_FILES if name != broker)
    assert not any(path.exists() for path in files(other))
    assert all(path.exists() for path in files(broker)[1:])
    assert (tmp_path / "docker-compose.yml").exists()
    assert not (tmp_path / "compose").exists()


def test_post_gen_refuses_an_unknown_broker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown broker 'nats'"):
        POST.prune(tmp_path, "nats", "pkg")
