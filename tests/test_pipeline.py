"""The whole pipeline end to end on tiny models (every stage, real Ray/DeepSpeed/FAISS), and
its resume: a second run finds every stage done and does no work."""

from __future__ import annotations

import pytest
import yaml

from qgscale import config, pipeline, storage
from qgscale.data import readers

TINY = {
    "run": {"name": "tiny", "seed": 3},
    "ray": {"num_cpus": 2},
    "data": {"format": "xquad", "input": readers.bundled("xquad"), "query_langs": ["de"],
             "corpus_langs": ["en"]},
    "qg": {"model": {"init": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64,
                              "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4},
                     "tokenizer": "xquad-tokenizer:2000"},
           "max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
           "max_query_len": 24, "checkpoint_every": 1000},
    "encoder": {"model": {"init": {"model_type": "bert", "hidden_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 4,
                                   "intermediate_size": 64},
                          "tokenizer": "xquad-tokenizer:2000"},
                "pooling": "mean", "normalize": True, "temperature": 0.1},
    "warmup": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
               "max_query_len": 24, "checkpoint_every": 1000,
               "loss": {"alpha": 0.0, "beta": 0.0}},
    "distill": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
                "max_query_len": 24, "checkpoint_every": 1000,
                "loss": {"alpha": 1.0, "beta": 0.5, "n_candidates": 4}},
    "teacher": {"score": {"num_actors": 1, "shard_pairs": 1500, "precision": "fp32"},
                "generate": {"langs": ["en"], "num_queries": 1, "max_new_tokens": 8}},
    "index": {"factory": "Flat", "cpus_per_actor": 1},
    "mine": {"top_k": 4, "n_negatives": 2},
    "eval": {"k": [1, 5, 10], "top_k": 10},
}


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tmp_path, ray_local):
    raw = dict(TINY, run={**TINY["run"], "root": str(tmp_path / "run")})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)

    results = pipeline.run(cfg)
    assert list(results) == pipeline.STAGE_NAMES

    # Every stage left its manifest, and the counts tie together.
    data = storage.read_manifest(cfg.uri("data"))
    n_train_queries = data["rows"]["train/queries"]
    candidates = storage.read_parquet(cfg.uri("mine", "candidates"))
    assert candidates.num_rows == n_train_queries
    n_pairs = sum(len(p) for p in candidates.column("pids").to_pylist())
    scores = storage.read_parquet(cfg.uri("teacher", "scores"))
    assert scores.num_rows == n_pairs
    assert len(set(zip(scores.column("qid").to_pylist(), scores.column("pid").to_pylist(),
                       strict=True))) == n_pairs
    generated = storage.read_parquet(cfg.uri("teacher", "generated"))
    assert set(generated.column("lang").to_pylist()) == {"en"}
    for stage in ("qg", "warmup", "distill"):
        assert storage.exists(storage.join(pipeline.model_uri(cfg, stage), "config.json")) or \
            storage.list_files(pipeline.model_uri(cfg, stage))
    for student in pipeline.STUDENTS:
        metrics = storage.read_json(cfg.uri("eval", student, "test", "metrics.json"))
        assert metrics["n_queries"] == data["rows"]["test/queries"]
        mrr = metrics["query_langs_macro"]["mrr@10"]
        assert 0.0 <= mrr <= 1.0
    table = pipeline.summary_table(results["eval"])
    assert "| warmup | test |" in table and "| distill | test |" in table

    # Resume: a second run finds every manifest and redoes nothing.
    before = {s: storage.read_json(u)["time"] for s, u in _manifests(cfg).items()}
    pipeline.run(cfg)
    after = {s: storage.read_json(u)["time"] for s, u in _manifests(cfg).items()}
    assert before == after


def _manifests(cfg) -> dict[str, str]:
    folders = {"data": cfg.uri("data"), "qg": cfg.uri("train", "qg"),
               "warmup": cfg.uri("train", "warmup"), "mine": cfg.uri("mine"),
               "scores": cfg.uri("teacher", "scores"),
               "generated": cfg.uri("teacher", "generated"),
               "distill": cfg.uri("train", "distill")}
    return {k: storage.join(v, storage.MANIFEST) for k, v in folders.items()}
