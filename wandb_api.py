r"""Edit the metadata of finished W&B runs in bulk: select the runs of an
entity/project by regular expressions on their fields, then rename a config key,
replace a substring in run names or in config values, or add and remove tags.

Nothing is written unless you pass --apply: by default the script prints the
planned change of every selected run (a dry run). It talks to W&B through the
public `wandb.Api` (needs network access and an API key: `wandb login` or
WANDB_API_KEY).

Selecting runs (`--where FIELD=REGEX`, repeatable, all must match; Python `re.search`
semantics, so anchor with ^...$ for a whole-string match; no --where selects all):
    name=REGEX          the run's display name
    id=REGEX            the run's id (the 8-character name in its URL)
    tags=REGEX          any of the run's tags
    config=REGEX        any top-level config key
    config.KEY=REGEX    the value of config key KEY (as a string)

Examples:
    # see which runs would have config key `lr` renamed to `learning_rate`
    python wandb_api.py my-team/mat_bench --rename-key lr learning_rate
    # then write it, only for Wrenformer runs
    python wandb_api.py my-team/mat_bench --where config.model='^wrenformer$' \
        --rename-key lr learning_rate --apply
    # fix a typo in run names and config values of runs tagged `phonons`
    python wandb_api.py my-team/mat_bench --where tags=phonons \
        --replace-in-name wrenfromer wrenformer \
        --replace-in-config wrenfromer wrenformer
    # retag the runs whose name starts with roost-
    python wandb_api.py my-team/mat_bench --where name='^roost-' \
        --add-tag roostformer --remove-tag roost --apply

Caveat: W&B merges the config sent by the public API into the stored one, so a
renamed key's old name may survive on the server beside the new one
(wandb/wandb#11055). After --apply the script re-reads every renamed run from W&B
and warns about each run that kept the old key.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mat_bench.data import ArgumentParser, UserError

WHERE_FIELDS = ("name", "id", "tags", "config", "config.KEY")
MAX_CELL = 40  # characters per value in the printed table


# --- selecting runs -----------------------------------------------------------------
def compile_regex(pattern: str, what: str) -> re.Pattern:
    """re.compile with a UserError that names the offending option."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(
            f"invalid regular expression {pattern!r} in {what}: {exc}; fix it (quote "
            "it for the shell, escape literal characters such as . or ( with \\)"
        ) from exc


def parse_where(spec: str) -> tuple[str, re.Pattern]:
    """Parse `FIELD=REGEX` into (field, compiled regex)."""
    field_name, sep, pattern = spec.partition("=")
    if not sep or not field_name:
        raise UserError(
            f"--where {spec!r} is not FIELD=REGEX: e.g. --where name='^wren' "
            f"(fields: {', '.join(WHERE_FIELDS)})"
        )
    if field_name not in WHERE_FIELDS[:-1] and not (
        field_name.startswith("config.") and len(field_name) > len("config.")
    ):
        raise UserError(
            f"--where field {field_name!r} is unknown: use one of "
            f"{', '.join(WHERE_FIELDS)}"
        )
    return field_name, compile_regex(pattern, f"--where {spec}")


def field_values(run: Any, field_name: str) -> list[str]:
    """The strings of a run that a --where field is matched against."""
    if field_name == "name":
        return [run.name or ""]
    if field_name == "id":
        return [run.id]
    if field_name == "tags":
        return list(run.tags or [])
    if field_name == "config":
        return list(run.config)
    key = field_name.removeprefix("config.")
    return [str(run.config[key])] if key in run.config else []


def run_matches(run: Any, where: Sequence[tuple[str, re.Pattern]]) -> bool:
    """True if, for every (field, regex), one of the run's values matches."""
    return all(
        any(regex.search(value) for value in field_values(run, field_name))
        for field_name, regex in where
    )


# --- planning changes ---------------------------------------------------------------
@dataclass
class Actions:
    """The edits requested on the command line."""

    rename_key: tuple[str, str] | None = None
    replace_in_name: tuple[str, str] | None = None
    replace_in_config: tuple[str, str] | None = None
    config_keys: re.Pattern | None = None  # limits replace_in_config to these keys
    add_tags: list[str] = field(default_factory=list)
    remove_tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise UserError for no action or contradictory ones."""
        if not (self.rename_key or self.replace_in_name or self.replace_in_config
                or self.add_tags or self.remove_tags):
            raise UserError(
                "nothing to do: pass --rename-key, --replace-in-name, "
                "--replace-in-config, --add-tag or --remove-tag"
            )
        if self.rename_key and self.rename_key[0] == self.rename_key[1]:
            raise UserError("--rename-key OLD NEW: OLD and NEW are the same key")
        for opt, pair in (("--rename-key", self.rename_key),
                          ("--replace-in-name", self.replace_in_name),
                          ("--replace-in-config", self.replace_in_config)):
            if pair and not pair[0]:
                raise UserError(f"{opt} OLD NEW: OLD must not be empty")
        if both := set(self.add_tags) & set(self.remove_tags):
            raise UserError(f"tag(s) {', '.join(sorted(both))} both added and removed")
        if any(not tag.strip() for tag in self.add_tags):
            raise UserError("--add-tag: a tag must not be empty")


@dataclass
class Change:
    """One planned edit of one run; `skipped` says why it will not be made."""

    what: str  # "name", "tags", "config.KEY" or "config key"
    before: Any
    after: Any
    skipped: str = ""


def plan_changes(run: Any, actions: Actions) -> list[Change]:
    """The edits `actions` would make to `run` (none if nothing applies)."""
    changes = []
    config = run.config
    if actions.rename_key and actions.rename_key[0] in config:
        old, new = actions.rename_key
        skipped = ""
        if new in config and config[new] != config[old]:
            skipped = f"{new!r} already set to {config[new]!r}"
        changes.append(Change("config key", old, new, skipped))
    if actions.replace_in_name:
        old, new = actions.replace_in_name
        if old in (run.name or ""):
            changes.append(Change("name", run.name, run.name.replace(old, new)))
    if actions.replace_in_config:
        old, new = actions.replace_in_config
        for key, value in config.items():
            if (isinstance(value, str) and old in value and (
                    actions.config_keys is None or actions.config_keys.search(key))):
                changes.append(Change(f"config.{key}", value, value.replace(old, new)))
    tags = list(run.tags or [])
    new_tags = [tag for tag in tags if tag not in actions.remove_tags]
    new_tags += [tag for tag in actions.add_tags if tag not in new_tags]
    if new_tags != tags:
        changes.append(Change("tags", tags, new_tags))
    return changes


def apply_changes(run: Any, changes: list[Change]) -> None:
    """Make the (not skipped) changes on `run` and save it with run.update()."""
    for change in changes:
        if change.skipped:
            continue
        if change.what == "config key":
            value = run.config.pop(change.before)
            run.config.setdefault(change.after, value)
        elif change.what == "name":
            run.name = change.after
        elif change.what == "tags":
            run.tags = list(change.after)
        elif change.what.startswith("config."):
            run.config[change.what.removeprefix("config.")] = change.after
    run.update()


# --- W&B access ---------------------------------------------------------------------
def make_api() -> Any:
    """A wandb.Api, with UserErrors for a missing or rejected API key."""
    import wandb
    from wandb.errors import CommError, UsageError

    try:
        return wandb.Api(timeout=60)
    except UsageError as exc:
        raise UserError(
            "no W&B API key configured: run `wandb login` or set WANDB_API_KEY"
        ) from exc
    except CommError as exc:
        raise UserError(
            f"could not log in to W&B ({str(exc)[:200]}): check WANDB_API_KEY, "
            "WANDB_BASE_URL and your network"
        ) from exc


def check_path(path: str) -> None:
    """Raise UserError unless path looks like ENTITY/PROJECT."""
    if not re.fullmatch(r"[^/\s]+/[^/\s]+", path):
        raise UserError(
            f"{path!r} is not ENTITY/PROJECT: pass e.g. my-team/mat_bench (as in the "
            "project's URL wandb.ai/my-team/mat_bench)"
        )


def fetch_runs(api: Any, path: str) -> list[Any]:
    """All runs of a project, configs included; UserError if it does not exist."""
    from wandb.errors import CommError

    try:
        return list(api.runs(path, per_page=200, lazy=False))
    except (ValueError, CommError) as exc:
        if "not find project" in str(exc) or "not found" in str(exc).lower():
            raise UserError(
                f"unknown W&B project {path!r} (or no access to it): check the entity "
                "and project names in the project's URL"
            ) from exc
        raise UserError(f"could not list the runs of {path}: {str(exc)[:200]}") from exc


def stale_renamed_keys(api: Any, path: str, runs: list[Any], old_key: str) -> list[str]:
    """Ids of renamed runs whose config, read back from W&B, still has old_key."""
    return [run.id for run in runs if old_key in api.run(f"{path}/{run.id}").config]


# --- report -------------------------------------------------------------------------
def short(value: Any) -> str:
    """A value as one table cell of at most MAX_CELL characters."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def format_plan(plan: list[tuple[Any, list[Change]]]) -> str:
    """A table with one line per planned change: run id, name, field, before, after."""
    header = ("run id", "name", "change", "before", "after", "note")
    rows = [
        (run.id, short(run.name or ""), change.what, short(change.before),
         short(change.after), f"skipped: {change.skipped}" if change.skipped else "")
        for run, changes in plan for change in changes
    ]
    widths = [max(len(str(row[col])) for row in [header, *rows]) for col in range(6)]
    lines = ["  ".join(str(cell).ljust(w)
                       for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(plan: list[tuple[Any, list[Change]]], n_runs: int, n_matched: int) -> str:
    """One paragraph: runs checked, matched, to change, and changes by kind."""
    made = [c for _, changes in plan for c in changes if not c.skipped]
    kinds = {
        "config keys renamed": sum(c.what == "config key" for c in made),
        "names edited": sum(c.what == "name" for c in made),
        "config values edited": sum(c.what.startswith("config.") for c in made),
        "tag lists edited": sum(c.what == "tags" for c in made),
    }
    n_skipped = sum(bool(c.skipped) for _, changes in plan for c in changes)
    n_to_change = sum(any(not c.skipped for c in changes) for _, changes in plan)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n) or "no edits"
    text = (f"{n_runs} runs in the project, {n_matched} selected, {n_to_change} to "
            f"change: {counts}")
    return text + (f"; skipped: {n_skipped} (see the note column)" if n_skipped else "")


# --- driver -------------------------------------------------------------------------
def edit_runs(
    api: Any,
    path: str,
    where: Sequence[tuple[str, re.Pattern]],
    actions: Actions,
    apply: bool = False,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Select the runs of `path` matching `where`, plan `actions` on them, print the
    plan and, if `apply`, write it. Returns counts and the ids written/failed."""
    check_path(path)
    actions.check()
    runs = fetch_runs(api, path)
    selected = [run for run in runs if run_matches(run, where)]
    if not selected:
        conditions = " and ".join(f"{f}~/{r.pattern}/" for f, r in where) or "(all)"
        raise UserError(
            f"no run of {path} matches {conditions} ({len(runs)} runs checked): "
            "loosen the --where patterns"
        )
    plan = [(run, plan_changes(run, actions)) for run in selected]
    plan = [(run, changes) for run, changes in plan if changes]
    if plan:
        out(format_plan(plan))
    else:
        out(f"none of the {len(selected)} selected runs needs a change")
    out("")
    out(summarize(plan, len(runs), len(selected)))
    result = {"n_runs": len(runs), "n_selected": len(selected), "written": [],
              "failed": [], "stale": []}
    todo = [(run, changes) for run, changes in plan
            if any(not c.skipped for c in changes)]
    if not apply:
        if todo:
            out("dry run: nothing was written; pass --apply to make these changes")
        return result
    for run, changes in todo:
        try:
            apply_changes(run, changes)
            result["written"].append(run.id)
        except Exception as exc:  # one run's failure must not stop the others
            result["failed"].append(run.id)
            out(f"failed to update run {run.id}: "
                f"{type(exc).__name__}: {str(exc)[:200]}")
    out(f"applied: {len(result['written'])} runs updated, "
        f"{len(result['failed'])} failed")
    if actions.rename_key:
        renamed = [run for run, changes in todo if run.id in result["written"] and any(
            c.what == "config key" and not c.skipped for c in changes)]
        result["stale"] = stale_renamed_keys(api, path, renamed, actions.rename_key[0])
        if result["stale"]:
            out(f"warning: W&B kept the old key {actions.rename_key[0]!r} beside "
                f"the new one on {len(result['stale'])} runs "
                f"({', '.join(result['stale'])}): its public API merges configs "
                "and cannot delete keys (wandb/wandb#11055)")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (top of wandb_api.py) for examples.",
    )
    parser.add_argument("path", metavar="ENTITY/PROJECT", help="the W&B project")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=REGEX",
                        help=f"select runs; FIELD is one of {', '.join(WHERE_FIELDS)}; "
                        "repeat to require several (default: all runs)")
    parser.add_argument("--rename-key", nargs=2, metavar=("OLD", "NEW"),
                        help="rename config key OLD to NEW")
    parser.add_argument("--replace-in-name", nargs=2, metavar=("OLD", "NEW"),
                        help="replace substring OLD by NEW in run display names")
    parser.add_argument("--replace-in-config", nargs=2, metavar=("OLD", "NEW"),
                        help="replace substring OLD by NEW in top-level string config "
                        "values")
    parser.add_argument("--config-key", metavar="REGEX",
                        help="limit --replace-in-config to keys matching REGEX")
    parser.add_argument("--add-tag", action="append", default=[], metavar="TAG",
                        help="add a tag (repeatable)")
    parser.add_argument("--remove-tag", action="append", default=[], metavar="TAG",
                        help="remove a tag (repeatable)")
    parser.add_argument("--apply", action="store_true",
                        help="write the changes (default: dry run, print them only)")
    return parser


def main(
    argv: Sequence[str] | None = None, api_factory: Callable[[], Any] = make_api
) -> int:
    """CLI entry point; `api_factory` returns a wandb.Api (tests pass a stand-in).
    Returns the exit code: 0 done, 1 some runs failed to update, 2 user error."""
    args = build_parser().parse_args(argv)
    try:
        where = [parse_where(spec) for spec in args.where]
        actions = Actions(
            rename_key=tuple(args.rename_key) if args.rename_key else None,
            replace_in_name=(tuple(args.replace_in_name)
                             if args.replace_in_name else None),
            replace_in_config=(tuple(args.replace_in_config)
                               if args.replace_in_config else None),
            config_keys=(compile_regex(args.config_key, "--config-key")
                         if args.config_key else None),
            add_tags=args.add_tag,
            remove_tags=args.remove_tag,
        )
        if actions.config_keys and not actions.replace_in_config:
            raise UserError("--config-key only applies to --replace-in-config: add it")
        check_path(args.path)
        actions.check()
        result = edit_runs(api_factory(), args.path, where, actions, apply=args.apply)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
