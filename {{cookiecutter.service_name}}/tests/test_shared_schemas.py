"""`make proto`'s first step (schemas.py): the shared schema set's files into proto/.
Template-owned; do not edit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import schemas

ORDERS = 'syntax = "proto3";\npackage stock.events;\nimport "stock/money.proto";\n'


def service_with_set(tmp_path: Path, **settings: str | list[str]) -> Path:
    """A service folder with schemas.toml pointing at a directory set beside it."""
    shared = tmp_path / "set"
    files = {
        "stock/events/orders.proto": ORDERS,
        "stock/money.proto": 'syntax = "proto3";\npackage stock;\n',
        "shipping/events/parcels.proto": 'syntax = "proto3";\npackage shipping.events;\n',
        # Never taken: the service's own folder, the envelope, well-known types.
        f"{schemas.PACKAGE}/events/orders.proto": "// the set's copy\n",
        "io/cloudevents/v1/cloudevents.proto": "// the set's copy\n",
        "google/protobuf/any.proto": "// the set's copy\n",
    }
    for relative, text in files.items():
        (shared / relative).parent.mkdir(parents=True, exist_ok=True)
        (shared / relative).write_text(text)
    service = tmp_path / "service"
    (service / "proto").mkdir(parents=True)
    config = {"source": "../set", **settings}
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    (service / schemas.CONFIG).write_text("\n".join(lines) + "\n")
    return service


def test_takes_the_included_files_and_their_imports_but_never_the_services_own(
    tmp_path: Path,
) -> None:
    service = service_with_set(tmp_path, include=["stock/events/*.proto"])
    taken = schemas.sync(service)
    assert taken == [Path("stock/events/orders.proto"), Path("stock/money.proto")]
    copied = (service / "proto" / "stock" / "events" / "orders.proto").read_text()
    assert copied.startswith("// Taken from the shared schema set")
    assert copied.endswith(ORDERS)
    assert not (service / "proto" / schemas.PACKAGE).exists()
    lock = json.loads((service / schemas.LOCK).read_text())
    assert lock["files"] == [str(path) for path in taken]


def test_files_no_longer_wanted_are_removed_with_their_empty_folders(tmp_path: Path) -> None:
    service = service_with_set(tmp_path)
    assert Path("shipping/events/parcels.proto") in schemas.sync(service)
    config = service / schemas.CONFIG
    config.write_text(config.read_text() + 'include = ["stock/**/*.proto"]\n')
    schemas.sync(service)
    assert not (service / "proto" / "shipping").exists()
    assert (service / "proto" / "stock" / "money.proto").exists()


def test_no_source_takes_nothing_and_removes_what_was_taken(tmp_path: Path) -> None:
    service = service_with_set(tmp_path)
    schemas.sync(service)
    (service / schemas.CONFIG).write_text('source = ""\n')
    assert schemas.sync(service) == []
    assert [path.name for path in (service / "proto").iterdir()] == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('source = "../set"\nbranch = "main"\n', "schemas.toml: unknown setting(s) branch"),
        ('source = "../set"\ninclude = ["nothing/*.proto"]\n', "has no .proto file matching"),
        ('source = "https://user:token@git.invalid/x.git"\n', "cannot fetch https://git.invalid"),
    ],
)
def test_problems_are_one_line_without_credentials(
    tmp_path: Path, config: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    service = service_with_set(tmp_path)
    (service / schemas.CONFIG).write_text(config)
    with pytest.raises(schemas.SchemaError) as raised:
        schemas.sync(service)
    assert message in str(raised.value)
    assert "token" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_buf_lints_the_services_own_files_not_the_sets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file from the set is linted where it is written; here it need not pass."""
    service = service_with_set(tmp_path, include=["shipping/**/*.proto"])
    parcels = tmp_path / "set" / "shipping" / "events" / "parcels.proto"
    parcels.write_text(parcels.read_text() + "message Parcel { string parcelId = 1; }\n")
    shutil.copy(schemas.ROOT / "buf.yaml", service / "buf.yaml")
    own = service / "proto" / schemas.PACKAGE / "events" / "own.proto"
    own.parent.mkdir(parents=True)
    package = f"package {schemas.PACKAGE}.events;\n"
    own.write_text('syntax = "proto3";\n' + package + "message Own {}\n")
    schemas.sync(service)
    assert schemas.check(service) == 0
    (service / schemas.LOCK).unlink()  # the same file as if it were the service's own
    assert schemas.check(service) != 0
