"""Tests of wandb_api.py. No W&B server is reachable here, so these tests drive the
script's logic through a stand-in (FakeApi, FakeRun below) with the interface of the
parts of `wandb.Api` and `wandb.apis.public.Run` that the script uses: Api.runs(path,
...), Api.run(path), Run.id/.name/.config/.tags and Run.update(). The stand-in keeps
a 'server' copy of each run that only update() changes, so the tests check what is
written, not just what is planned. The real `wandb.Api` is exercised only by the
no-API-key test."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest

from mat_bench.data import UserError
from mat_bench.wandb_api import main, make_api, parse_where

PROJECT = "my-team/mat_bench"


class FakeRun:
    """Like wandb.apis.public.Run: id, settable name and tags, a config dict,
    update() writes them to the server."""

    def __init__(self, server: FakeServer, stored: dict[str, Any]) -> None:
        self._server = server
        self.id = stored["id"]
        self.name = stored["name"]
        self.tags = list(stored["tags"])
        self.config = copy.deepcopy(stored["config"])

    def update(self) -> None:
        self._server.write(self)


class FakeServer:
    """The runs of some projects. `merge_config` mimics W&B keeping config keys that
    an update no longer sends (wandb/wandb#11055); `fail_ids` make update() raise."""

    def __init__(self, projects: dict[str, list[dict]], merge_config: bool = False,
                 fail_ids: tuple[str, ...] = ()) -> None:
        self.projects = copy.deepcopy(projects)
        self.merge_config = merge_config
        self.fail_ids = fail_ids
        self.n_updates = 0

    def stored(self, run_id: str) -> dict[str, Any]:
        return next(run for runs in self.projects.values() for run in runs
                    if run["id"] == run_id)

    def write(self, run: FakeRun) -> None:
        if run.id in self.fail_ids:
            raise RuntimeError("upsertBucket failed: 500 Internal Server Error")
        stored = self.stored(run.id)
        stored["name"], stored["tags"] = run.name, list(run.tags)
        if self.merge_config:
            stored["config"].update(copy.deepcopy(run.config))
        else:
            stored["config"] = copy.deepcopy(run.config)
        self.n_updates += 1


class FakeApi:
    """Like wandb.Api: runs(path, ...) lists a project's runs (ValueError 'Could not
    find project' for an unknown one, as wandb raises); run('e/p/id') fetches one."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.api_key = "x" * 40

    def runs(self, path: str, filters: dict | None = None, order: str = "+created_at",
             per_page: int = 50, include_sweeps: bool = False, lazy: bool = True):
        if path not in self.server.projects:
            raise ValueError(f"Could not find project {path.split('/')[-1]}")
        return [FakeRun(self.server, run) for run in self.server.projects[path]]

    def run(self, path: str) -> FakeRun:
        return FakeRun(self.server, self.server.stored(path.rsplit("/", 1)[-1]))


RUNS = [
    {"id": "a1", "name": "wrenformer-phonons-fold0", "tags": ["phonons", "v1"],
     "config": {"model": "wrenformer", "lr": 1e-4, "data": "phonons.csv"}},
    {"id": "b2", "name": "wrenformer-phonons-fold1", "tags": ["phonons"],
     "config": {"model": "wrenformer", "lr": 3e-4, "data": "phonons.csv"}},
    {"id": "c3", "name": "roostformer-steels", "tags": ["steels", "v1"],
     "config": {"model": "roostformer", "learning_rate": 1e-3, "data": "steels.csv"}},
    {"id": "d4", "name": "wrenformer-conflict", "tags": [],
     "config": {"model": "wrenformer", "lr": 1e-4, "learning_rate": 5e-4}},
]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer({PROJECT: RUNS})


def run_cli(argv: list[str], server: FakeServer, capsys) -> tuple[int, str, str]:
    code = main(argv, api_factory=lambda: FakeApi(server))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- selection ----------------------------------------------------------------------
def test_parse_where() -> None:
    field, regex = parse_where("config.model=^wren")
    assert field == "config.model" and regex.search("wrenformer")
    assert parse_where("name=a=b")[1].pattern == "a=b"  # split at the first =
    for bad, message in [("name", "not FIELD=REGEX"), ("=x", "not FIELD=REGEX"),
                         ("colour=red", "unknown"), ("config.=x", "unknown"),
                         ("tags=[", "invalid regular expression")]:
        with pytest.raises(UserError, match=message):
            parse_where(bad)


def test_dry_run_renames_nothing(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli([PROJECT, "--rename-key", "lr", "learning_rate"], server,
                           capsys)
    assert code == 0
    assert server.n_updates == 0 and server.projects[PROJECT] == RUNS
    lines = out.splitlines()
    assert lines[0].split() == ["run", "id", "name", "change", "before", "after",
                                "note"]
    table = "\n".join(lines[:6])
    assert "a1" in table and "b2" in table and "c3" not in table  # c3 has no lr
    assert "skipped: 'learning_rate' already set to 0.0005" in table  # d4
    assert ("4 runs in the project, 4 selected, 2 to change: "
            "2 config keys renamed") in out
    assert "skipped: 1 (see the note column)" in out
    assert "dry run: nothing was written; pass --apply" in out


def test_apply_rename_key(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli(
        [PROJECT, "--where", "config.model=^wrenformer$", "--rename-key", "lr",
         "learning_rate", "--apply"], server, capsys)
    assert code == 0
    stored = {run["id"]: run["config"] for run in server.projects[PROJECT]}
    assert stored["a1"] == {"model": "wrenformer", "learning_rate": 1e-4,
                            "data": "phonons.csv"}
    assert stored["b2"]["learning_rate"] == 3e-4 and "lr" not in stored["b2"]
    assert stored["d4"] == RUNS[3]["config"]  # conflict: left alone
    assert server.n_updates == 2
    assert "applied: 2 runs updated, 0 failed" in out
    assert "warning" not in out


def test_rename_kept_by_server_is_reported(capsys) -> None:
    server = FakeServer({PROJECT: RUNS}, merge_config=True)
    code, out, _ = run_cli([PROJECT, "--where", "id=^a1$", "--rename-key", "lr", "eta",
                            "--apply"], server, capsys)
    assert code == 0
    assert "warning: W&B kept the old key 'lr'" in out and "(a1)" in out


def test_replace_in_names_and_config(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli(
        [PROJECT, "--where", "name=phonons", "--replace-in-name", "wrenformer", "wren",
         "--replace-in-config", "phonons", "ph", "--config-key", "^data$", "--apply"],
        server, capsys)
    assert code == 0
    stored = {run["id"]: run for run in server.projects[PROJECT]}
    assert stored["a1"]["name"] == "wren-phonons-fold0"
    assert stored["b2"]["name"] == "wren-phonons-fold1"
    assert stored["a1"]["config"]["data"] == "ph.csv"
    assert stored["a1"]["config"]["model"] == "wrenformer"  # key not selected
    assert stored["c3"] == RUNS[2] and stored["d4"] == RUNS[3]  # not selected
    assert "2 names edited, 2 config values edited" in out


def test_add_and_remove_tags(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli([PROJECT, "--where", "tags=^v1$", "--add-tag", "matbench",
                            "--remove-tag", "v1", "--apply"], server, capsys)
    assert code == 0
    tags = {run["id"]: run["tags"] for run in server.projects[PROJECT]}
    assert tags == {"a1": ["phonons", "matbench"], "b2": ["phonons"],
                    "c3": ["steels", "matbench"], "d4": []}
    assert "2 tag lists edited" in out


def test_several_where_must_all_match(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli([PROJECT, "--where", "tags=phonons",
                            "--where", "name=fold1$", "--add-tag", "x"], server, capsys)
    assert code == 0
    assert "4 runs in the project, 1 selected, 1 to change" in out
    assert "b2" in out and "a1" not in out


def test_where_config_key(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli([PROJECT, "--where", "config=^learning_rate$",
                            "--add-tag", "x"], server, capsys)
    assert code == 0 and "2 selected" in out  # c3 and d4


def test_selected_runs_needing_no_change(server: FakeServer, capsys) -> None:
    code, out, _ = run_cli([PROJECT, "--where", "name=steels", "--remove-tag", "nope",
                            "--apply"], server, capsys)
    assert code == 0 and server.n_updates == 0
    assert "none of the 1 selected runs needs a change" in out


def test_failed_update_is_reported(capsys) -> None:
    server = FakeServer({PROJECT: RUNS}, fail_ids=("a1",))
    code, out, _ = run_cli([PROJECT, "--add-tag", "x", "--apply"], server, capsys)
    assert code == 1
    assert "failed to update run a1: RuntimeError" in out
    assert "applied: 3 runs updated, 1 failed" in out


# --- user errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["other-team/nope", "--add-tag", "x"],
         "unknown W&B project 'other-team/nope'"),
        (["mat_bench", "--add-tag", "x"], "is not ENTITY/PROJECT"),
        ([PROJECT, "--where", "name=(", "--add-tag", "x"],
         "invalid regular expression"),
        ([PROJECT, "--add-tag", "x", "--config-key", "[a"],
         "invalid regular expression"),
        ([PROJECT, "--where", "name=^zzz", "--add-tag", "x"],
         "no run of my-team/mat_bench"),
        ([PROJECT], "nothing to do"),
        ([PROJECT, "--rename-key", "lr", "lr"], "the same key"),
        ([PROJECT, "--replace-in-name", "", "x"], "OLD must not be empty"),
        ([PROJECT, "--add-tag", "v1", "--remove-tag", "v1"], "both added and removed"),
        ([PROJECT, "--add-tag", "x", "--config-key", "data"], "--config-key only"),
    ],
)
def test_user_errors(argv: list[str], message: str, server: FakeServer, capsys) -> None:
    code, out, err = run_cli(argv, server, capsys)
    assert code == 2 and server.n_updates == 0
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_no_api_key_with_real_wandb(monkeypatch, tmp_path) -> None:
    """The real wandb.Api without any key configured (no network needed)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: never prompt
    with pytest.raises(UserError, match="no W&B API key configured"):
        make_api()
