"""``qgscale``: one entry point; each subcommand is a thin wrapper over a stage function.

A user error (:class:`qgscale.errors.QgscaleError`: bad config, bad data, a missing input or
stage output) ends as one line on stderr, ``qgscale: error: <message>``, with exit code 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Annotated, Literal

import click
import typer
import yaml
from typer.core import TyperGroup

from qgscale import config as config_mod
from qgscale import storage
from qgscale.errors import ConfigError, MissingInputError, report
from qgscale.layout import STUDENTS, Layout


class _Group(TyperGroup):
    """The root command group: reports user errors of every subcommand as one line."""

    def invoke(self, ctx: click.Context):
        from qgscale import logs

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            logs.failed(e)
            code = report(e)
            if code is None:
                raise
            raise typer.Exit(code) from None
        finally:
            logs.sync()  # a remote run root's log, with the error


app = typer.Typer(help="Cross-lingual dense retrieval with a query-generator teacher, on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group)
data_app = typer.Typer(help="Convert and inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
train_app = typer.Typer(help="Ray Train + DeepSpeed training.", no_args_is_help=True)
teacher_app = typer.Typer(help="Query-generator teacher on Ray actors.", no_args_is_help=True)
index_app = typer.Typer(help="Encoding, FAISS indexes, search and mining.",
                        no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(train_app, name="train")
app.add_typer(teacher_app, name="teacher")
app.add_typer(index_app, name="index")

@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False
           ) -> None:
    from qgscale import logs

    logs.console(verbose)


ConfigArg = Annotated[str, typer.Argument(help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config key: key.path=value (repeatable).")]


def load(config: str, overrides: list[str] | None) -> config_mod.Config:
    from qgscale import logs

    cfg = config_mod.load(config, overrides)
    logs.to_run_folder(cfg.run.root)
    return cfg


def _print(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


@config_app.command("show")
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


def _given(ctx: typer.Context, names: Iterable[str]) -> list[str]:
    """The options among the parameters ``names`` given on the command line, as flags."""
    names = set(names)
    # by name: typer vendors its own click, whose ParameterSource is not click's
    return [p.opts[0] for p in ctx.command.params if p.name in names
            and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]


@data_app.command("prepare")
def data_prepare(
    ctx: typer.Context,
    format: Annotated[str | None, typer.Option(help="xquad, xor-tydi, mkqa, tatoeba, beir, "
                                                    "dpr, qas, passages, jsonl")] = None,
    input: Annotated[str | None, typer.Option(help="Raw file or folder (path or URI).")] = None,
    output: Annotated[str | None, typer.Option(help="Output folder (path or URI).")] = None,
    passages: Annotated[str | None, typer.Option(
        help="Passage collection (xor-tydi, qas; dpr: the corpus instead of inline passages)."
    )] = None,
    query_langs: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    corpus_langs: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    kind: Annotated[str | None, typer.Option(help="Canonical kind for --format jsonl.")] = None,
    lang: Annotated[str, typer.Option(help="Language of a beir, dpr, qas or passages dataset."
                                      )] = "und",
    test_mod: Annotated[int, typer.Option(help="xquad: article % N == 0 -> test.", min=1)
                        ] = 4,
    answer_lang: Annotated[str | None, typer.Option(
        help="mkqa: every question's answers in this language (e.g. en).")] = None,
    shard_rows: Annotated[int, typer.Option(help="Rows per parquet shard.", min=1)] = 2000,
    on_error: Annotated[str, typer.Option(help="fail, or skip (bad rows -> _rejected.jsonl)."
                                          )] = "fail",
    config: Annotated[str | None, typer.Option(help="Take the data section of a config.")] = None,
    set: Overrides = None,
) -> None:
    """Convert a raw dataset into canonical parquet shards."""
    from fsspec.utils import infer_compression

    from qgscale.data.collection import MIN_UNIT_BYTES, UNIT_BYTES, collection_files
    from qgscale.data.prepare import (
        COLLECTION_FORMATS,
        READ_ARGS,
        check_args,
        collection_of,
        prepare,
    )

    if config:
        ignored = _given(ctx, (p.name for p in ctx.command.params
                               if p.name not in ("config", "set")))
        if ignored:
            raise ConfigError(f"--config takes every setting from the config's data section: "
                              f"leave out {', '.join(ignored)} (or --config)")
        _stage(config, set, "prepare")
        return
    if set:
        raise ConfigError("--set overrides a config: give it with --config")
    if not (format and input and output):
        raise typer.BadParameter("give --format, --input and --output (or --config)")
    if format in READ_ARGS:  # an unknown format: prepare's error
        unused = {n for args in READ_ARGS.values() for n in args} - {*READ_ARGS[format]}
        if ignored := _given(ctx, unused):
            raise ConfigError(f"--format {format} does not use {', '.join(ignored)}")
    if on_error not in ("fail", "skip"):
        raise typer.BadParameter("--on-error must be fail or skip")
    args = dict(passages=passages, query_langs=_langs(query_langs),
                corpus_langs=_langs(corpus_langs), test_mod=test_mod, kind=kind, lang=lang,
                answer_lang=answer_lang)
    # what is prepared: a re-run of it resumes, anything else starts the output afresh
    key = storage.config_hash({"format": format, "on_error": on_error, "shard_rows": shard_rows,
                               **args, "input": input, "input_fp": storage.fingerprint(input),
                               "passages_fp": passages and storage.fingerprint(passages)})
    coll = None
    if format in COLLECTION_FORMATS:  # a collection read in byte ranges, on Ray?
        check_args(format, **{k: args[k] for k in ("passages", "corpus_langs", "kind", "lang")})
        coll = collection_of(format, input, **args)
    files = collection_files(coll[0], format == "jsonl") if coll else []
    sizes = [fs.size(p) for fs, p in map(storage.url_to_fs, files)]
    if len(files) > 1 and sum(sizes) > MIN_UNIT_BYTES or sizes and sizes[0] > UNIT_BYTES and \
            infer_compression(files[0]) is None:  # several ranges (a compressed file: one)
        from qgscale import runtime

        runtime.connect()  # its units on Ray tasks: RAY_ADDRESS's cluster, else a local Ray
        runtime.check_shared({"--passages" if coll[0] == passages else "--input": coll[0]},
                             {"--output": output})  # the collection: read on every node
    summary = prepare(format, input, output, on_error=on_error, shard_rows=shard_rows,
                      config_hash=key, **args)
    _print(summary)
    if summary["rejected"]:
        typer.secho(f"{summary['rejected']} rows rejected: see {output}/_rejected.jsonl",
                    fg="yellow", err=True)


@data_app.command("export")
def data_export(input: Annotated[str, typer.Option(help="Parquet file or shard folder.")],
                output: Annotated[str, typer.Option(help="JSONL file to write.")]) -> None:
    """Export canonical parquet to JSONL."""
    from qgscale.data.prepare import export_jsonl

    typer.echo(f"{export_jsonl(input, output)} rows -> {output}")


def _stage(config: str, overrides: list[str] | None, name: str) -> dict:
    """Run one stage through the pipeline's runner (skipped when done) and print its summary."""
    from qgscale import pipeline

    summary = pipeline.run(load(config, overrides), only=name)[name]
    _print(summary)
    return summary


@app.command("run")
def run(config: ConfigArg, set: Overrides = None,
        from_: Annotated[str | None, typer.Option("--from", help="Start at this stage.")] = None,
        only: Annotated[str | None, typer.Option(help="Run only this stage.")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Print each stage's state (done, stale, missing); run nothing."
        )] = False) -> None:
    """Run the pipeline: every stage that is not done, in order (see ``--dry-run``)."""
    from qgscale import pipeline

    for opt, name in (("--from", from_), ("--only", only)):
        if name and name not in pipeline.STAGE_NAMES:
            raise typer.BadParameter(f"unknown stage {name!r}; stages: "
                                     f"{', '.join(pipeline.STAGE_NAMES)}", param_hint=opt)
    pipeline.select(from_, only)  # --from with --only: an error before anything loads
    cfg = load(config, set)
    if dry_run:
        for status in pipeline.plan(cfg, from_, only):
            typer.echo(status.line())
        return
    results = pipeline.run(cfg, start=from_, only=only)
    if "eval" in results:
        _eval_summary(cfg, results["eval"])
    for split, r in (results.get("rerank") or {}).items():
        if not r.get("n_queries"):
            typer.echo(f"teacher rerank ({split}): no query with a relevant passage in the "
                       "warm-up top-k")
            continue
        s, t = r["student"]["macro"]["mrr@10"], r["teacher"]["macro"]["mrr@10"]
        typer.echo(f"teacher rerank of the warm-up top-{r['rerank_k']} ({split}): MRR@10 "
                   f"{t:.4f} vs the student's own order {s:.4f}"
                   + ("" if t > s else "  <- the teacher is not better"))


def _eval_summary(cfg: config_mod.Config, results: dict) -> None:
    """The metrics table of every student, and where the reports and plots are."""
    from qgscale import pipeline

    typer.echo(pipeline.summary_table(results))
    lay = Layout(cfg)
    for student, by_split in results.items():
        for split in by_split:
            typer.echo(f"{student}/{split}: {storage.join(lay.eval_dir(student), split)}/"
                       "{metrics.md,pairs.png}")


@train_app.command("qg")
def train_qg(config: ConfigArg, set: Overrides = None) -> None:
    """Fine-tune the query generator (seq2seq CE with the language prompt)."""
    _stage(config, set, "train-qg")


@train_app.command("qg-rank")
def train_qg_rank(config: ConfigArg, set: Overrides = None) -> None:
    """Ranking fine-tune of the QG teacher on the mined hard negatives (listwise + gen NLL)."""
    _stage(config, set, "qg-rank")


@train_app.command("warmup")
def train_warmup(config: ConfigArg, set: Overrides = None) -> None:
    """Contrastive warm-up of the dual encoder."""
    _stage(config, set, "warmup")


@train_app.command("distill")
def train_distill(config: ConfigArg, set: Overrides = None) -> None:
    """Contrastive + KD + alignment training of the dual encoder."""
    _stage(config, set, "distill")


@teacher_app.command("score")
def teacher_score(config: ConfigArg, set: Overrides = None) -> None:
    """Score the mined (query, candidate) pairs distillation reads with the QG teacher."""
    _stage(config, set, "score")


@teacher_app.command("generate")
def teacher_generate(config: ConfigArg, set: Overrides = None) -> None:
    """Generate queries in other languages for the training passages on Ray actors."""
    _stage(config, set, "generate")


@index_app.command("build")
def index_build(config: ConfigArg, set: Overrides = None) -> None:
    """Encode the training corpus with the warm-up student and build its FAISS index."""
    _stage(config, set, "index")


@index_app.command("reindex")
def index_reindex(config: ConfigArg, set: Overrides = None) -> None:
    """Encode and index each eval split's corpus with the warm-up and distilled students."""
    _stage(config, set, "reindex")


@index_app.command("mine")
def index_mine(config: ConfigArg, set: Overrides = None) -> None:
    """Retrieve candidates and hard negatives for the training queries."""
    _stage(config, set, "mine")


def _search_inputs(cfg: config_mod.Config, lay: Layout, student: str, split: str
                   ) -> tuple[str, str]:
    """The model and index URIs ``index search`` reads; an error naming the stage that writes
    one when it is missing, or when no stage builds an index of ``student`` on ``split``."""
    from qgscale import pipeline

    index_dir = lay.index_dir(student, split)
    if index_dir == lay.index_dir("warmup", "train"):
        index_stage = "index"
    elif index_dir in {lay.index_dir(s, sp) for s, sp in pipeline.reindexed(cfg, lay)}:
        index_stage = "reindex"
    else:
        raise ConfigError(f"--model {student} --split {split}: no stage builds that index "
                          f"(index: warmup on train; reindex: {', '.join(STUDENTS)} on "
                          f"eval.splits {', '.join(cfg.eval.splits)})")
    model_uri, index_uri = lay.model(student), lay.faiss(student, split)
    model_stage = "distill" if student == "distill" else "warmup"  # init: saved by warmup
    for what, uri, stage, present in (
            ("model", model_uri, model_stage, storage.exists(model_uri)),
            ("index", index_uri, index_stage, storage.read_manifest(index_uri) is not None)):
        if not present:
            raise MissingInputError(f"index search: {what} {uri} does not exist; stage {stage} "
                                    f"writes it: run `qgscale run CONFIG --only {stage}` (or the "
                                    "whole pipeline) first")
    return model_uri, index_uri


@index_app.command("search")
def index_search(config: ConfigArg, query: Annotated[list[str], typer.Option(
                     help="Query text (repeatable).")],
                 set: Overrides = None,
                 model: Annotated[Literal[STUDENTS], typer.Option(help="Student.")
                                  ] = "warmup",
                 split: Annotated[str, typer.Option(help="Corpus split of the index.")
                                  ] = "train",
                 k: int = 10) -> None:
    """Encode queries with a student and search its index (as the pipeline wrote them), one
    Ray actor per index shard (``ray.address``; this process holds neither the index nor its
    id map)."""
    from qgscale.index.encode import load_dual_encoder
    from qgscale.index.search import ShardedSearcher, search_resources
    from qgscale.runtime import bundles, connect, requesting

    cfg = load(config, set)
    lay = Layout(cfg)
    model_uri, index_uri = _search_inputs(cfg, lay, model, split)
    enc = load_dual_encoder(model_uri)
    sc = cfg.index.search
    vecs = enc.encode_queries(query, sc.batch_size).float().numpy()
    connect(cfg.ray)
    shards, _ = search_resources(index_uri, sc, encoder=False)
    with requesting("index.search", bundles(shards)):
        searcher = ShardedSearcher(index_uri, sc.nprobe, sc.ef_search, shards.num_cpus,
                                   sc.refine, sc.k_factor, num_gpus=shards.num_gpus,
                                   gpus_explicit=bool(sc.gpus_per_actor))
        try:
            pids, scores = searcher.search(vecs, k)
        finally:
            searcher.close()
    _print([{"query": q, "hits": [[p, float(s)] for p, s in zip(pp, ss, strict=True)]}
            for q, pp, ss in zip(query, pids.tolist(), scores.tolist(), strict=True)])


@app.command("eval")
def eval_(config: ConfigArg, set: Overrides = None) -> None:
    """Evaluate the warm-up and distilled students (see also ``python -m qgscale.eval``)."""
    from qgscale import pipeline

    cfg = load(config, set)
    _eval_summary(cfg, pipeline.run(cfg, only="eval")["eval"])


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
