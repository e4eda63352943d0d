"""Config: YAML -> typed sections; errors name the key path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qgscale import config
from qgscale.errors import ConfigError, MissingInputError

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = config.load(f)
        assert cfg.run.name


@pytest.mark.parametrize("text,expected", [
    ("teacher:\n  score:\n    batch_tokenz: 4\n", r"c.yaml: teacher.score.batch_tokenz: Extra"),
    ("warmup:\n  zero_stage: 5\n", r"c.yaml: warmup.zero_stage: Input should be 0, 1, 2 or 3"),
    ("index:\n  search: {nprobe: many}\n",
     r"c.yaml: index.search.nprobe: Input should be a valid integer"),
    ("qg:\n  model: {}\n", r"c.yaml: qg.model: Value error, give name_or_path or init"),
    ("data:\n  format: csv\n", r"c.yaml: data.format: Input should be"),
    ("run: [1, 2]\n", r"c.yaml: run: Input should be a valid dictionary"),
    # values that would fail deep inside a stage (a division by zero, an empty batch) or
    # could never run (a canonical JSONL file is one kind, not a dataset)
    ("data:\n  test_mod: 0\n", r"c.yaml: data.test_mod: Input should be greater than or equal"),
    ("data:\n  shard_rows: 0\n", r"c.yaml: data.shard_rows: Input should be greater"),
    ("data:\n  format: jsonl\n", r"c.yaml: data.format: Input should be"),
    # a data option the format does not read is an error, not ignored
    ("data:\n  passages: p.tsv\n", r"c.yaml: data(.|\n)*passages: format xquad reads no "
     r"passage collection"),
    ("data:\n  lang: en\n", r"c.yaml: data(.|\n)*lang: format xquad takes each row's"),
    ("data:\n  {format: dpr, query_langs: [de]}\n", r"query_langs: format dpr reads every"),
    ("data:\n  {format: dpr, lang: ' '}\n", r"c.yaml: data(.|\n)*lang: empty"),
    ("data:\n  answer_lang: en\n", r"answer_lang: format xquad has one answer list"),
    ("data:\n  {format: dpr, corpus_langs: [en, de]}\n", r"a DPR file's passages carry no"),
    ("data:\n  {format: dpr, passages: p.tsv}\n", r"corpus_langs: give the passage "
     r"collection's language"),
    ("data:\n  {format: dpr}\n", r"eval.data: a dpr file is training data with no eval"),
    ("data:\n  {format: qas, passages: p.tsv, corpus_langs: [en]}\n",
     r"eval.data: a qas file is training data with no eval"),
    ("data:\n  {format: qas}\n", r"passages: a qas file holds questions and answers only"),
    ("data:\n  {format: qas, passages: p.tsv}\n", r"corpus_langs: give the passage "),
    ("data:\n  {format: qas, query_langs: [en]}\n", r"query_langs: format qas reads every"),
    ("distill:\n  batch_size: 0\n", r"c.yaml: distill.batch_size: Input should be greater"),
    ("distill:\n  loss: {tau_t: 0}\n", r"c.yaml: distill.loss.tau_t: Input should be greater"),
    ("teacher:\n  score: {num_actors: 0}\n", r"c.yaml: teacher.score.num_actors: Input should"),
    ("index:\n  search: {nprobe: 0}\n", r"c.yaml: index.search.nprobe: Input should be greater"),
    ("mine:\n  top_k: 0\n", r"c.yaml: mine.top_k: Input should be greater"),
    ("eval:\n  k: [1, -1]\n", r"c.yaml: eval.k.1: Input should be greater than or equal to 1"),
    ("eval:\n  k: [1, 200]\n", r"c.yaml: eval(.|\n)*k: recall@200 needs top_k >= 200 passages "
     r"per query \(top_k=100\)"),
    ("eval:\n  chart_metric: mrr@100\n", r"c.yaml: eval(.|\n)*chart_metric: 'mrr@100' is not "
     r"one of \['recall@1'"),
    ("eval:\n  {chart_metric: acc@20, answer_accuracy: off}\n",
     r"chart_metric: 'acc@20' is not one of"),
    ("eval:\n  {chart_metric: r@2kt, answer_recall: false}\n",
     r"chart_metric: 'r@2kt' is not one of"),
    ("data:\n  {format: qas, passages: p.tsv, corpus_langs: [en]}\neval: {data: d}\n"
     "bm25: {positives: off}\n", r"bm25.positives: off leaves a qas file without"),
    ("ray:\n  num_cpus: -2\n", r"c.yaml: ray.num_cpus: Input should be greater"),
    ("distill:\n  lr: .inf\n", r"c.yaml: distill.lr: Input should be a finite number"),
    ("distill:\n  loss: {alpha: .nan}\n", r"c.yaml: distill.loss.alpha: Input should be a "
     r"finite number"),
    # YAML's true / yes / on are booleans, which pydantic would read as 1 for a number
    ("distill:\n  batch_size: yes\n", r"c.yaml: distill.batch_size: Value error, expected a "
     r"number, got the boolean True"),
    ("distill:\n  zero_stage: true\n", r"c.yaml: distill.zero_stage: .*boolean True"),
    ("eval:\n  k: [1, on]\n", r"c.yaml: eval.k: .*boolean \[1, True\]"),
    ("ray:\n  num_gpus: false\n", r"c.yaml: ray.num_gpus: .*boolean False"),
    # a key given twice: PyYAML would keep the second block and drop the first
    ("run:\n  root: /tmp/r\n  seed: 5\ndata: {format: xquad}\nrun:\n  name: x\n",
     r"c.yaml: invalid YAML: key 'run' given twice \(first on line 1\)(.|\n)*line 5"),
    ("warmup:\n  lr: 0.1\n  lr: 0.2\n", r"key 'lr' given twice \(first on line 2\)"),
    # found at load, not when the stage starts after hours of earlier stages
    ("qg_rank: {n_negatives: 9}\nmine: {n_negatives: 8}\n",
     r"qg_rank.n_negatives=9 > mine.n_negatives=8: the mined examples hold at most 8"),
    ("qg:\n  prompt: 'query: {passage}'\n", r"c.yaml: qg.prompt: Value error, 'query: "
     r"\{passage\}' must contain \{lang\} and \{passage\}"),
    ("teacher:\n  generate: {num_queries: 3}\n", r"c.yaml: teacher.generate(.|\n)*"
     r"num_queries=3 needs num_beams >= num_queries \(num_beams=1\) or do_sample: true"),
    ("teacher:\n  generate: {langs: []}\n", r"teacher.generate(.|\n)*langs is empty"),
    ("distill:\n  precision: bf16\n", r"c.yaml: distill(.|\n)*precision: bf16 needs "
     r"zero_stage >= 1"),
    ("teacher:\n  score: {gpus_per_actor: 1.5}\n", r"c.yaml: teacher.score.gpus_per_actor: "
     r"Value error, 1.5: expected a fraction of one GPU"),
])
def test_errors_name_the_key_path(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        config.load(_yaml(tmp_path, text))


def test_invalid_yaml_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        config.load(_yaml(tmp_path, "run: [unclosed\n"))
    cfg = config.load(_yaml(tmp_path, "run:\n  name: x\n"),
                      ["index.search.nprobe=4", "run.seed=7"])
    assert cfg.index.search.nprobe == 4 and cfg.run.seed == 7
    assert os.path.isabs(cfg.run.root)
    with pytest.raises(ConfigError, match=r"index.nprobee: Extra"):
        config.load(_yaml(tmp_path, "{}\n"), ["index.nprobee=4"])


def test_load_errors_are_user_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MissingInputError, match=f"{missing}: config file not found"):
        config.load(missing)
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a folder"):
        config.load(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"run:\n  name: \xff\n")
    with pytest.raises(ConfigError, match=r"bin.yaml: not a UTF-8 text file"):
        config.load(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match=r"override 'run.name.x=1': run.name is not a section"):
        config.load(_yaml(tmp_path, "run:\n  name: x\n"), ["run.name.x=1"])
    with pytest.raises(ConfigError, match=r"override 'run.seed=\[': invalid YAML value"):
        config.load(_yaml(tmp_path, "{}\n"), ["run.seed=["])


def test_cli_config_show_hides_secrets(tmp_path):
    p = _yaml(tmp_path, "storage:\n  endpoint_url: http://127.0.0.1:9\n"
                        "  secret_access_key: hunter2\n")
    out = subprocess.run([sys.executable, "-m", "qgscale.cli", "config", "show", str(p)],
                         capture_output=True, text=True,
                         env=os.environ | {"AWS_SECRET_ACCESS_KEY": ""})
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "secret_access_key: '***'" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "qgscale.cli", "config", "show",
                          str(_yaml(tmp_path, "index:\n  factoryy: Flat\n"))],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "index.factoryy: Extra inputs" in bad.stderr


def test_text_overrides_keep_their_words(tmp_path):
    """A text field's override is the text as typed, not YAML's reading of it: a prompt with
    ": " is not a mapping, 2024 not a number, off/no not False; quotes and null still work;
    other fields stay YAML (numbers, mappings)."""
    cfg = config.load(_yaml(tmp_path, "run:\n  name: x\n"), [
        "qg.prompt=query in {lang}: {passage}", "run.name=2024", "data.query_langs=[de,no]",
        "bm25.positives=off", "eval.out=null", "eval.data='s3://b/x'", "warmup.lr=1e-4",
        "qg.model.init={model_type: t5, d_model: 8}"])
    assert cfg.qg.prompt == "query in {lang}: {passage}" and cfg.run.name == "2024"
    assert cfg.data.query_langs == ["de", "no"] and cfg.bm25.positives == "off"
    assert cfg.eval.out is None and cfg.eval.data == "s3://b/x" and cfg.warmup.lr == 1e-4
    assert cfg.qg.model.init == {"model_type": "t5", "d_model": 8}


def test_eval_never_falls_back_to_the_training_queries(tmp_path):
    """A run that trains on unsplit data (XOR-TyDi: data/queries) and names no eval.data has
    no test split to evaluate: an error, not an eval on the training queries."""
    import pyarrow as pa

    from qgscale import storage
    from qgscale.layout import Layout

    def layout(*sets: str) -> Layout:
        return Layout(config.load(_yaml(tmp_path, "run:\n  name: x\n"),
                                  [f"run.root={tmp_path / 'run'}", *sets]))

    storage.write_parquet(str(tmp_path / "run" / "data" / "queries" / "part-00000.parquet"),
                          pa.table({"qid": ["q1"]}))
    with pytest.raises(ConfigError, match=r"eval.splits: the run's data \S+ has no 'test' "
                                          r"split \(its queries, \S+/data/queries, are the "
                                          r"training queries\): set eval.data"):
        layout().eval_data()
    assert layout("eval.data=/elsewhere/dev").eval_data() == "/elsewhere/dev"
    assert layout("eval.students_from=/xor-run").eval_data() == str(tmp_path / "run" / "data")
    storage.write_parquet(str(tmp_path / "run" / "data" / "test" / "queries" / "p.parquet"),
                          pa.table({"qid": ["q2"]}))
    assert layout().eval_data() == str(tmp_path / "run" / "data")


def test_dpr_data_with_a_collection_validates(tmp_path):
    cfg = config.load(_yaml(tmp_path, "data:\n  {format: dpr, input: t.json, passages: p.tsv, "
                                      "lang: en, corpus_langs: [en]}\neval:\n  {data: dev}\n"))
    assert (cfg.data.format, cfg.data.lang, cfg.eval.data.rsplit("/", 1)[-1]) == (
        "dpr", "en", "dev")
    with pytest.raises(ConfigError, match="data.lang: Input should be a valid string"):
        config.load(_yaml(tmp_path, "data:\n  {format: dpr, lang: [en]}\neval: {data: d}\n"))


def test_l2_index_needs_a_normalized_student():
    """An L2 index ranks by distance, which is the student's dot-product order only for unit
    vectors: with encoder.normalize false it is a config error, naming both settings."""
    with pytest.raises(ConfigError, match="index.build.metric: l2 .* encoder.normalize"):
        config.parse({"index": {"build": {"metric": "l2"}}})
    assert config.parse({"index": {"build": {"metric": "l2"}},
                         "encoder": {"normalize": True}}).index.build.metric == "l2"
