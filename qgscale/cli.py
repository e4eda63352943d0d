"""``qgscale``: one entry point; each subcommand is a thin wrapper over a stage function."""

from __future__ import annotations

import json
import sys
from functools import wraps
from typing import Annotated

import typer
import yaml

from qgscale import config as config_mod

app = typer.Typer(help="Cross-lingual dense retrieval with a query-generator teacher, on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Convert and inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

ConfigArg = Annotated[str, typer.Argument(help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key: key.path=value (repeatable).")]


def clean_errors(fn):
    """Report bad input and bad config as one clear line (exit 2), not a traceback."""
    from qgscale.data.readers import DataError

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, config_mod.ConfigError, FileNotFoundError) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
    return wrapper


def load(config: str, overrides: list[str] | None) -> config_mod.Config:
    return config_mod.load(config, overrides)


def _print(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


@config_app.command("show")
@clean_errors
def config_show(config: ConfigArg, set: Overrides = None) -> None:
    """Print the resolved config (defaults filled in; secrets hidden)."""
    cfg = load(config, set)
    dump = cfg.model_dump(mode="json")
    for key in ("access_key_id", "secret_access_key"):
        if dump["storage"].get(key):
            dump["storage"][key] = "***"
    typer.echo(yaml.safe_dump(dump, sort_keys=False, allow_unicode=True))


def _langs(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


@data_app.command("prepare")
@clean_errors
def data_prepare(
    format: Annotated[str | None, typer.Option(help="xquad, xor-tydi, mkqa, tatoeba, beir, "
                                                    "jsonl")] = None,
    input: Annotated[str | None, typer.Option(help="Raw file or folder (path or URI).")] = None,
    output: Annotated[str | None, typer.Option(help="Output folder (path or URI).")] = None,
    passages: Annotated[str | None, typer.Option(help="Passage collection (xor-tydi).")] = None,
    query_langs: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    corpus_langs: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    kind: Annotated[str | None, typer.Option(help="Canonical kind for --format jsonl.")] = None,
    lang: Annotated[str, typer.Option(help="Language of a beir dataset.")] = "und",
    test_mod: Annotated[int, typer.Option(help="xquad: article % N == 0 -> test.")] = 4,
    shard_rows: Annotated[int, typer.Option(help="Rows per parquet shard.")] = 2000,
    on_error: Annotated[str, typer.Option(help="fail, or skip (bad rows -> _rejected.jsonl)."
                                          )] = "fail",
    config: Annotated[str | None, typer.Option(help="Take the data section of a config.")] = None,
    set: Overrides = None,
) -> None:
    """Convert a raw dataset into canonical parquet shards."""
    from qgscale.data.prepare import prepare, run_prepare

    if config:
        _print(run_prepare(load(config, set)))
        return
    if not (format and input and output):
        raise typer.BadParameter("give --format, --input and --output (or --config)")
    if on_error not in ("fail", "skip"):
        raise typer.BadParameter("--on-error must be fail or skip")
    summary = prepare(format, input, output, on_error=on_error, shard_rows=shard_rows,
                      passages=passages, query_langs=_langs(query_langs),
                      corpus_langs=_langs(corpus_langs), test_mod=test_mod, kind=kind, lang=lang)
    _print(summary)
    if summary["rejected"]:
        typer.secho(f"{summary['rejected']} rows rejected: see {output}/_rejected.jsonl",
                    fg="yellow", err=True)


@data_app.command("export")
@clean_errors
def data_export(input: Annotated[str, typer.Option(help="Parquet file or shard folder.")],
                output: Annotated[str, typer.Option(help="JSONL file to write.")]) -> None:
    """Export canonical parquet to JSONL."""
    from qgscale.data.prepare import export_jsonl

    typer.echo(f"{export_jsonl(input, output)} rows -> {output}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
