"""The whole pipeline end to end on tiny models (every stage, real Ray/DeepSpeed/FAISS), and
its resume: a second run finds every stage done and does no work."""

from __future__ import annotations

import json

import pytest

from qgscale import config, pipeline, storage
from qgscale.errors import MissingInputError
from qgscale.layout import STUDENTS, Layout
from tests.conftest import REPO, copy_run


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
    """A copy of the session's tiny pipeline run (every stage, tiny models); the later tests
    read and change it."""
    path, results = tiny_run
    path = copy_run(path, tmp_path_factory.mktemp("pipeline"))
    return path, config.load(path), results


def _records(cfg) -> dict[str, dict]:
    lay = Layout(cfg)
    return {s: storage.read_json(lay.record(s)) for s in pipeline.STAGE_NAMES}


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(finished_run, tmp_path, monkeypatch):
    _, cfg, results = finished_run
    assert list(results) == pipeline.STAGE_NAMES
    lay = Layout(cfg)

    # Every stage left its output and record, and the counts tie together.
    data = storage.read_manifest(cfg.uri("data"))
    n_train_queries = data["rows"]["train/queries"]
    candidates = storage.read_parquet(lay.candidates)
    assert candidates.num_rows == n_train_queries
    n_pairs = sum(min(len(p), cfg.distill.loss.n_candidates)  # the pairs rows read
                  for p in candidates.column("pids").to_pylist())
    scores = storage.read_parquet(lay.scores)
    assert scores.num_rows == n_pairs
    assert len(set(zip(scores.column("qid").to_pylist(), scores.column("pid").to_pylist(),
                       strict=True))) == n_pairs
    generated = storage.read_parquet(lay.generated)
    assert set(generated.column("lang").to_pylist()) == {"en"}
    for stage in ("qg", "qg-rank", "warmup", "distill"):
        assert storage.list_files(lay.model(stage))
    # the teacher's ranking fine-tune: every training example, its loss logged by parts
    n_examples = storage.read_parquet(lay.mined_train).num_rows
    assert results["qg-rank"]["counts"]["rows"] == n_examples
    rank_log = [json.loads(x) for x in storage.read_bytes(storage.join(
        lay.train_dir("qg-rank"), "metrics.jsonl")).decode().splitlines() if x.strip()]
    assert rank_log[-1]["step"] == 4
    assert all(abs(x["loss"] - x["rank"] - 0.5 * x["gen"]) < 1e-3 for x in rank_log)
    assert lay.teacher_model().name_or_path == lay.model("qg-rank")  # score/rerank use it
    # XQuAD has gold positives: bm25 makes no training data, only the baseline row
    assert "skipped" in storage.read_manifest(lay.bm25_train)
    assert not storage.exists(storage.join(lay.bm25_train, "examples"))
    for student in ("bm25", *STUDENTS):
        metrics = storage.read_json(storage.join(lay.eval_dir(student), "test", "metrics.json"))
        assert metrics["n_queries"] == data["rows"]["test/queries"]
        mrr = metrics["query_langs_macro"]["mrr@10"]
        assert 0.0 <= mrr <= 1.0
    table = pipeline.summary_table(results["eval"])
    assert all(f"| {s} | test |" in table for s in ("bm25", "init", "warmup", "distill"))
    side_by_side = storage.read_bytes(lay.comparison("test", "md")).decode()
    assert side_by_side.startswith("| mrr@10 | bm25 | init | warmup | distill |")
    assert "| de->en |" in side_by_side
    assert storage.read_bytes(lay.comparison("test", "png"))[:4] == b"\x89PNG"
    for split, r in results["rerank"].items():  # teacher vs student order, same top-k lists
        assert split == "test" and r["n_queries"] == data["rows"]["test/queries"]
        for who in ("student", "teacher"):
            assert 0.0 <= r[who]["macro"]["mrr@10"] <= 1.0
        assert set(r["teacher"]["query_langs"]) == {"de"}
    # the same rerank compared 7 queries at a time: the same result, to the last bit
    from qgscale.eval import rerank

    monkeypatch.setattr(rerank, "RERANK_BLOCK", 7)
    assert data["rows"]["test/queries"] % 7
    again = rerank.run_rerank(cfg, lay.teacher_model(), storage.join(
        lay.eval_dir("warmup"), "test", "run.parquet"), lay.eval_data(), "test",
        str(tmp_path / "rerank"), "blocks", corpus_uri=lay.data("test", "corpus"))
    want = results["rerank"]["test"]  # of the original run, before this copy of it
    assert again.pop("student_run") != want["student_run"]
    assert again == {k: v for k, v in want.items() if k != "student_run"}
    records = _records(cfg)
    assert all(r["state"] == "done" for r in records.values())

    # Resume: a second run finds every stage done and redoes nothing.
    assert [s.state for s in pipeline.plan(cfg)] == ["done"] * len(pipeline.STAGE_NAMES)
    again = pipeline.run(cfg)
    assert _records(cfg) == records
    assert pipeline.summary_table(again["eval"]) == table


def readme_commands() -> list[list[str]]:
    """The command lines of the README block marked as tested, CONFIG left as a word."""
    import shlex

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- tested:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_command_lines_run_on_a_finished_run(finished_run):
    import subprocess
    import sys

    path, cfg, _ = finished_run
    commands = readme_commands()
    assert len(commands) >= 10 and {c[0] for c in commands} <= {"qgscale", "python"}
    outputs = {}
    for words in commands:
        words = [str(path) if w == "CONFIG" else w for w in words]
        argv = ([sys.executable, "-m", "qgscale.cli", *words[1:]] if words[0] == "qgscale"
                else [sys.executable, *words[1:]])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, (words, proc.stderr[-2000:])
        outputs[" ".join(words[1:4])] = proc.stdout
    dry = outputs[f"run {path} --dry-run"].splitlines()
    assert dry == [f"{s}: done" for s in pipeline.STAGE_NAMES]
    assert "| distill | test |" in outputs[f"eval {path}"]
    lay = Layout(cfg)
    job = storage.read_json(storage.join(lay.uri("eval-job"), "test", "metrics.json"))
    pipeline_eval = storage.read_json(storage.join(lay.eval_dir("distill"), "test", "metrics.json"))
    assert job["macro"] == pipeline_eval["macro"]  # the job evaluates what the pipeline did
    # index search (one Ray actor per index shard) == the index loaded in this process
    import json

    from qgscale.index.encode import load_dual_encoder
    from qgscale.index.search import search

    words = next(c for c in commands if c[1:3] == ["index", "search"])
    query = words[words.index("--query") + 1]
    got = json.loads(outputs[f"index search {path}"])
    vecs = load_dual_encoder(lay.model("distill")).encode_queries([query]).float().numpy()
    sc = cfg.index.search
    pids, scores = search(lay.faiss("distill", "test"), vecs, 10, nprobe=sc.nprobe,
                          ef_search=sc.ef_search, refine=sc.refine, k_factor=sc.k_factor)
    assert [q["query"] for q in got] == [query] and len(got[0]["hits"]) == 10
    assert [p for p, _ in got[0]["hits"]] == pids[0].tolist()
    assert [s for _, s in got[0]["hits"]] == pytest.approx(scores[0].tolist(), abs=1e-5)


DESCENDANTS = {  # stage -> (a key of its config sections, the stages that must rerun[, other
    # stages whose own key reads it])
    "prepare": ("data.test_mod=3", pipeline.STAGE_NAMES),
    # XQuAD has gold positives: no training stage reads bm25
    "bm25": ("bm25.top_k=50", ["bm25"]),
    "bm25-eval": ("eval.pairs=false", ["bm25-eval", "eval", "rerank"]),
    "train-qg": ("qg.lr=0.0005", ["train-qg", "qg-rank", "generate", "score", "distill",
                                  "reindex", "eval", "rerank"]),
    "warmup": ("warmup.lr=0.0005", ["warmup", "index", "mine", "qg-rank", "score", "distill",
                                    "reindex", "eval", "rerank"]),
    "index": ("index.build.metric=l2",
              ["index", "mine", "qg-rank", "score", "distill", "reindex", "eval", "rerank"]),
    "mine": ("index.search.nprobe=4",
             ["mine", "qg-rank", "score", "distill", "reindex", "eval", "rerank"]),
    "qg-rank": ("qg_rank.gen_weight=0.25",
                ["qg-rank", "score", "distill", "reindex", "eval", "rerank"]),
    "generate": ("teacher.generate.max_new_tokens=6",
                 ["generate", "distill", "reindex", "eval", "rerank"]),
    "score": ("teacher.score.batch_tokens=5000",
              ["score", "distill", "reindex", "eval", "rerank"]),
    "distill": ("distill.lr=0.0005", ["distill", "reindex", "eval", "rerank"]),
    "reindex": ("eval.splits=[test, train]", ["bm25-eval", "reindex", "eval", "rerank"],
                ["bm25-eval"]),
    "eval": ("eval.k=[1, 5]", ["eval", "rerank"]),
    "rerank": ("teacher.rerank_k=5", ["rerank"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", pipeline.STAGE_NAMES)
def test_changed_key_makes_exactly_stage_and_descendants_stale(finished_run, stage):
    path, _, _ = finished_run
    override, stale, *also = DESCENDANTS[stage]
    direct = {stage, *(also[0] if also else [])}
    plan = {s.stage: s for s in pipeline.plan(config.load(path, [override]))}
    assert {name for name, s in plan.items() if s.state != "done"} == set(stale)
    for s in direct:
        assert plan[s].state == "stale"
        assert override.split("=")[0] in plan[s].reason  # says what changed
    assert all("will rerun" in plan[s].reason for s in stale if s not in direct)


@pytest.mark.slow
def test_runtime_settings_are_not_in_keys(finished_run):
    """More actors, CPUs or retries change how a stage runs, not what it writes: nothing is
    stale, so a crashed stage re-run on a bigger cluster resumes."""
    path, cfg, _ = finished_run
    b = cfg.warmup.batch_size
    assert cfg.warmup.num_workers == 1 and b % 2 == 0
    plan = pipeline.plan(config.load(path, [
        "teacher.score.num_actors=4", "teacher.generate.cpus_per_actor=0.5",
        "index.encode.num_actors=3", "index.build.max_retries=5",
        "index.search.cpus_per_actor=0.5",
        # training: twice the workers with the same samples per micro-step (elastic resume),
        # logging, checkpoint cadence, retries, tracking, prefetch, ZeRO communication
        "warmup.num_workers=2", f"warmup.batch_size={b // 2}", "distill.log_every=3",
        "qg.checkpoint_every=7", "qg_rank.max_failures=2", "distill.cpus_per_worker=0.5",
        "warmup.prefetch_batches=0", "distill.mlflow_uri=file:///tmp/mlruns",
        "qg.reduce_bucket_size=1000", "warmup.elastic_resume=weights",
        # the eval job's own inputs and outputs
        "eval.out=/tmp/elsewhere", "eval.model=/tmp/m", "eval.index=/tmp/i"]))
    assert [s.state for s in plan] == ["done"] * len(pipeline.STAGE_NAMES)
    # more workers with the same micro-batch: more samples per step, a new key
    plan = {s.stage: s for s in pipeline.plan(config.load(path, ["warmup.num_workers=2"]))}
    assert plan["warmup"].state == "stale"
    assert plan["warmup"].reason == (f"warmup.samples_per_micro_step: {b} -> {2 * b}")


@pytest.mark.slow
def test_dry_run_shows_the_selection(finished_run):
    """``--dry-run`` with ``--only`` / ``--from``: the stages outside the selection are marked,
    and a selected stage whose unselected upstream is not done says the run stops there."""
    path, _, _ = finished_run
    cfg = config.load(path, ["warmup.lr=0.0005"])  # warmup and its descendants stale
    lines = [s.line() for s in pipeline.plan(cfg, only="index")]
    assert lines[pipeline.STAGE_NAMES.index("index")] == (
        "index: stale (needs stage warmup (stale), not selected: the run stops here)")
    assert lines[pipeline.STAGE_NAMES.index("warmup")].endswith(" [not selected]")
    assert sum(not line.endswith("[not selected]") for line in lines) == 1
    with pytest.raises(MissingInputError, match="needs stage warmup"):  # what run would do
        pipeline.run(cfg, only="index")
    plan = pipeline.plan(cfg, start="warmup")  # warmup runs first: nothing stops
    assert all(s.selected == (i >= pipeline.STAGE_NAMES.index("warmup"))
               and "stops here" not in s.reason for i, s in enumerate(plan))
    assert [(s.state, s.reason) for s in plan] == [
        (s.state, s.reason) for s in pipeline.plan(cfg)]  # the selection only marks stages


@pytest.mark.slow
def test_more_candidates_rescore(finished_run):
    """The teacher scores the candidates distillation reads: another n_candidates re-scores."""
    path, _, _ = finished_run
    plan = {s.stage: s for s in pipeline.plan(config.load(path, ["distill.loss.n_candidates=3"]))}
    assert {n for n, s in plan.items() if s.state != "done"} == {
        "score", "distill", "reindex", "eval", "rerank"}
    assert "distill.loss.n_candidates" in plan["score"].reason


@pytest.mark.slow
def test_changed_upstream_file_invalidates_descendants(finished_run):
    """Same URI, new content: the prepared training queries are rewritten (rows reversed)."""
    import os

    import pyarrow.parquet as pq

    _, cfg, _ = finished_run
    shard = storage.list_files(cfg.uri("data", "train", "queries"), ".parquet")[0]
    local = storage.url_to_fs(shard)[1]
    before, stat = open(local, "rb").read(), os.stat(local)
    table = pq.read_table(local)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), local)
    try:
        plan = {s.stage: s for s in pipeline.plan(cfg)}
        assert plan["prepare"].state == "done"  # its own key (the raw input) is unchanged
        assert {n for n, s in plan.items() if s.state != "done"} == set(pipeline.STAGE_NAMES[1:])
        assert plan["train-qg"].reason == "input prepare changed"
    finally:
        open(local, "wb").write(before)
        os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [s.state for s in pipeline.plan(cfg)] == ["done"] * len(pipeline.STAGE_NAMES)


@pytest.mark.slow
def test_interrupted_training_stage_with_same_key_resumes(finished_run):
    """A distill run that died after its last checkpoint (record says running, no export):
    the same key resumes from that checkpoint instead of training from step 0."""
    _, cfg, _ = finished_run
    lay = Layout(cfg)
    record = storage.read_json(lay.record("distill"))
    metrics_uri = storage.join(lay.train_dir("distill"), "metrics.jsonl")
    steps_before = storage.read_bytes(metrics_uri).decode().count("\n")
    storage.write_json(lay.record("distill"), dict(record, state="running"))
    storage.remove(lay.model("distill"), recursive=True)
    plan = {s.stage: s for s in pipeline.plan(cfg)}
    assert plan["distill"].state == "interrupted"
    assert plan["reindex"].state == "stale"
    pipeline.run(cfg, only="distill")
    assert storage.list_files(lay.model("distill"))  # exported again
    assert storage.read_bytes(metrics_uri).decode().count("\n") == steps_before  # no step redone
    assert storage.read_json(lay.record("distill"))["key"] == record["key"]


@pytest.mark.slow
def test_changed_key_reruns_stage_and_descendants_only(finished_run):
    """qg_rank.gen_weight changed: the teacher's ranking fine-tune retrains from scratch (new
    weights, a fresh log), the stages downstream of it rerun (the new teacher's scores make a
    new student), and nothing else: prepare, train-qg, warmup, index, mine and generate are
    untouched."""
    import hashlib

    path, cfg, _ = finished_run
    lay = Layout(cfg)
    before = _records(cfg)

    def weights(stage: str) -> str:
        files = storage.list_files(lay.model(stage), ".safetensors")
        return hashlib.sha256(b"".join(storage.read_bytes(f) for f in files)).hexdigest()

    old = {s: weights(s) for s in ("qg-rank", "distill")}
    cfg2 = config.load(path, ["qg_rank.gen_weight=0.25"])
    pipeline.run(cfg2)
    after = _records(cfg2)
    rerun = {s for s in pipeline.STAGE_NAMES if after[s]["started"] != before[s]["started"]}
    assert rerun == set(DESCENDANTS["qg-rank"][1])
    assert all(weights(s) != old[s] for s in old)  # the teacher and the student changed
    log = storage.read_bytes(storage.join(lay.train_dir("qg-rank"), "metrics.jsonl")).decode()
    steps = [json.loads(x)["step"] for x in log.splitlines() if x.strip()]
    assert steps and steps == sorted(set(steps))  # one fresh run's log, not appended to
    assert [s.state for s in pipeline.plan(cfg2)] == ["done"] * len(pipeline.STAGE_NAMES)


def test_a_random_init_teacher_keys_on_the_seed():
    """A ``teacher.model`` built from ``init`` draws its weights with ``run.seed``: the stages
    that read it (score, rerank) rerun when the seed changes; a named checkpoint does not."""
    random = config.parse({"teacher": {"model": {"init": {"model_type": "t5", "d_model": 8}}}})
    named = config.parse({"teacher": {"model": {"name_or_path": "google/mt5-base"}}})
    for name in ("score", "rerank"):
        stage = pipeline.BY_NAME[name]
        assert "run.seed" not in stage.sections
        assert "run.seed" in pipeline.key_sections(stage, random)
        assert pipeline.key_sections(stage, named) == stage.sections
    generate = pipeline.BY_NAME["generate"]  # keyed on the seed already: listed once
    assert pipeline.key_sections(generate, random).count("run.seed") == 1


def test_a_code_version_in_the_key_marks_the_score_stage_stale():
    """With kd_on_generated the score stage's key carries a code version (its generated lists
    are scored whole since it): a record keyed before it is stale, and says why; without
    kd_on_generated the key is as it was."""
    score = pipeline.BY_NAME["score"]
    on = config.parse({"distill": {"loss": {"kd_on_generated": True}}})
    assert score.version(on) == 1 and score.version(config.parse({})) == 0
    assert pipeline.BY_NAME["distill"].version(on) == 0
    why = pipeline._what_changed({"config": {"a": 1}}, {"config": {"a": 1}, "version": 1})
    assert why == "code version 0 -> 1"


@pytest.mark.slow
def test_bm25_eval_keeps_the_splits_it_finished(finished_run):
    """bm25-eval re-run after a crash (its record not written): a split whose run finished
    under the stage's key is kept, not searched again."""
    path, cfg, _ = finished_run
    lay = Layout(cfg)
    key = pipeline.read_record(lay, "bm25-eval")["key"]
    runs = {s: storage.join(lay.bm25_eval(s), "run.parquet") for s in cfg.eval.splits}
    before = {s: storage.url_to_fs(u)[0].info(u)["mtime"] for s, u in runs.items()}
    out = pipeline.BY_NAME["bm25-eval"].run(cfg, lay, key)
    assert set(out) == set(cfg.eval.splits)
    assert {s: storage.url_to_fs(u)[0].info(u)["mtime"] for s, u in runs.items()} == before


def test_training_workers_checked_before_the_first_stage(tiny_run, tmp_path):
    """A training stage that will run and whose workers the cluster (2 CPUs) can never hold
    fails before the first stage, not after the stages before it; a stage recorded done is
    not checked (a runtime setting changed on a finished run reruns nothing). On its own
    copy of the session's run: the module's other tests change theirs."""
    from qgscale.runtime import ResourceError

    path = copy_run(tiny_run[0], tmp_path / "copy")
    fresh = config.load(path, [f"run.root={tmp_path / 'fresh'}", "distill.cpus_per_worker=64"])
    with pytest.raises(ResourceError, match=r"distill: num_workers=1 x cpus_per_worker=64"):
        pipeline.run(fresh)
    assert not storage.exists(Layout(fresh).data_root)  # prepare never ran
    done = config.load(path, ["distill.cpus_per_worker=64"])
    assert set(pipeline.run(done)) == set(pipeline.STAGE_NAMES)  # all skipped, no error
