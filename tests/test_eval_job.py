"""Evaluation: in-process on a tiny student + FAISS index over XQuAD test rows, and the real
``ray job submit ... -- python -m qgscale.eval`` against a ``ray start --head`` cluster."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from qgscale import storage
from qgscale.data import readers
from qgscale.data.prepare import write_tables

REPO = Path(__file__).resolve().parents[1]
LANGS = ["en", "de"]
N_QUERIES = 24  # per language


def _answers(qids: set[str]) -> list[dict]:
    """XQuAD answer strings (in the query's language) for R@kt."""
    rows = []
    for lang in LANGS:
        with gzip.open(f"{readers.bundled('xquad')}/xquad.{lang}.json.gz", "rt") as f:
            data = json.load(f)["data"]
        for article in data:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    qid = f"{lang}:{qa['id']}"
                    if qid in qids:
                        rows.append({"qid": qid, "answers": [a["text"] for a in qa["answers"]]})
    return rows


def build_run(root: str, tokenizer) -> dict:
    """Prepared data, a tiny student and its FAISS index in the pipeline's layout under root."""
    import faiss

    from qgscale.index.encode import encode_table
    from qgscale.models.encoder import DualEncoder
    from qgscale.models.tiny import tiny_bert

    tables = readers.read_xquad(readers.bundled("xquad"), LANGS, LANGS)
    queries = [q for lang in LANGS
               for q in [r for r in tables["test/queries"] if r["lang"] == lang][:N_QUERIES]]
    keep = {q["qid"] for q in queries}
    qrels = [r for r in tables["test/qrels"] if r["qid"] in keep]
    corpus = tables["test/corpus"]
    data = storage.join(root, "data")
    write_tables({"test/queries": queries, "test/qrels": qrels, "test/corpus": corpus,
                  "test/answers": _answers(keep)}, data, shard_rows=100)

    model_uri = storage.join(root, "train", "distill", "model")
    encoder = DualEncoder(tiny_bert(tokenizer, seed=3), tokenizer=tokenizer, pooling="mean")
    encoder.save_pretrained(model_uri)

    corpus_uri = storage.join(data, "test", "corpus")
    emb_uri = storage.join(root, "index", "distill-test", "embeddings")
    emb = encode_table(encoder, storage.read_parquet(corpus_uri), batch_size=32)
    w = storage.ShardWriter(emb_uri)
    w.write("part-00000", emb)
    w.finalize(["part-00000"], corpus=corpus_uri, dtype="float32")

    vecs = np.stack(emb.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    index_uri = storage.join(root, "index", "distill-test", "faiss")
    index = faiss.index_factory(vecs.shape[1], "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vecs, np.arange(len(vecs), dtype=np.int64))
    storage.write_bytes(storage.join(index_uri, "shards", "shard-00000.faiss"),
                        faiss.serialize_index(index).tobytes())
    ids = storage.ShardWriter(storage.join(index_uri, "ids"))
    ids.write("part-00000", pa.table({"id": np.arange(len(vecs), dtype=np.int64),
                                      "pid": emb.column("pid")}))
    ids.finalize(["part-00000"])
    storage.write_manifest(index_uri, "", factory="Flat", metric="ip", dim=vecs.shape[1],
                           ntotal=len(vecs), shards=["shards/shard-00000.faiss"], ondisk=False,
                           embeddings=emb_uri)
    return {"model": model_uri, "index": index_uri, "data": data, "vecs": vecs,
            "pids": emb.column("pid").to_pylist(), "encoder": encoder, "queries": queries,
            "corpus": corpus}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, tokenizer):
    root = str(tmp_path_factory.mktemp("evalrun") / "run")
    return root, build_run(root, tokenizer)


def _brute_force(qv, vecs, pids, allowed, k):
    mask = np.array([p in allowed for p in pids])
    scores = qv @ vecs[mask].T
    sub = np.array(pids, dtype=object)[mask]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [list(sub[row]) for row in order], np.take_along_axis(scores, order, 1)


def test_restricted_search_matches_brute_force(run_root):
    from qgscale.eval.evaluate import restricted_search
    from qgscale.index.search import load_index

    _, b = run_root
    loaded = load_index(b["index"])
    qv = b["encoder"].encode_queries([q["text"] for q in b["queries"]]).numpy()
    for cl in LANGS:
        allowed = {c["pid"] for c in b["corpus"] if c["lang"] == cl}
        ids = np.array([i for i, p in enumerate(loaded.pids) if p in allowed], dtype=np.int64)
        pids, scores = restricted_search(loaded, qv, 5, ids)
        exp_pids, exp_scores = _brute_force(qv, b["vecs"], b["pids"], allowed, 5)
        assert [list(r) for r in pids] == exp_pids
        np.testing.assert_allclose(scores, exp_scores, rtol=1e-5, atol=1e-5)
    pids, _ = restricted_search(loaded, qv, 5, None)  # unrestricted: the whole corpus
    assert [list(r) for r in pids] == _brute_force(qv, b["vecs"], b["pids"], set(b["pids"]),
                                                   5)[0]


def test_evaluate_split(run_root):
    from qgscale.eval import metrics as M
    from qgscale.eval.evaluate import evaluate_split, load_split
    from qgscale.index.search import load_index
    from qgscale.retrieval.answers import has_answer

    _, b = run_root
    data = load_split(b["data"], "test", storage.join(b["data"], "test", "corpus"))
    assert len(data.qids) == 2 * N_QUERIES and data.answers
    body = {c["pid"]: c["text"] for c in b["corpus"]}
    out = evaluate_split(b["encoder"], load_index(b["index"]), data, top_k=5, ks=[1, 5])
    assert set(out["pairs"]) == {"en->en", "en->de", "de->en", "de->de"}
    assert out["corpus_langs"] == sorted(LANGS) and out["n_queries"] == 2 * N_QUERIES
    qv = b["encoder"].encode_queries(data.texts).numpy()
    for ql in LANGS:
        rows = [i for i, q in enumerate(data.qids) if data.query_lang[q] == ql]
        for cl in LANGS:
            allowed = {c["pid"] for c in b["corpus"] if c["lang"] == cl}
            top, _ = _brute_force(qv[rows], b["vecs"], b["pids"], allowed, 5)
            hits = [bool(set(data.qrels[data.qids[i]]) & set(t))
                    for i, t in zip(rows, top, strict=True)]
            pair = out["pairs"][f"{ql}->{cl}"]
            assert pair["n"] == N_QUERIES
            assert pair["recall@5"] == pytest.approx(np.mean(hits))
            # acc@k: DPR's has_answer on the text of the first k, titles left out
            for k in (1, 5):
                found = [any(has_answer(data.answers[data.qids[i]], body[p]) for p in t[:k])
                         for i, t in zip(rows, top, strict=True)]
                assert pair[f"acc@{k}"] == pytest.approx(np.mean(found)), (ql, cl, k)
            assert pair["n_acc"] == N_QUERIES
            if ql == cl:  # a question's answer is in its own language's paragraph
                assert pair["acc@5"] > 0
    # pooled view: every query's top 5 over both languages; recall over both relevant passages
    assert all(len(r) == 5 for r in out["run"].values())
    direct = M.evaluate(out["run"], data.qrels, ["recall@5"])
    pooled_macro = np.mean([out["query_langs"][lang]["recall@5"] for lang in LANGS])
    assert direct["recall@5"] == pytest.approx(pooled_macro)  # equal-sized language groups
    assert out["macro"]["x->en"]["groups"] == 1 and out["macro"]["monolingual"]["groups"] == 2
    assert out["macro"]["x->en"]["mrr@10"] == out["pairs"]["de->en"]["mrr@10"]
    assert out["pairs"]["de->de"]["n_kt"] == N_QUERIES and "r@5kt" in out["pairs"]["en->de"]
    for lang in LANGS:  # the pooled view: over both languages' passages
        found = [any(has_answer(data.answers[q], body[p]) for p in M.ranking(out["run"][q], 5))
                 for q in data.qids if data.query_lang[q] == lang]
        assert out["query_langs"][lang]["acc@5"] == pytest.approx(np.mean(found))


def test_qrels_defects_are_named(run_root, tmp_path, caplog):
    """An empty qrels field is an error naming the file and row; a positive whose passage is
    not in the corpus (a miss for every model) is logged with its count and an example."""
    import logging

    from qgscale.data.schema import QRELS
    from qgscale.errors import DataError
    from qgscale.eval.evaluate import evaluate_split, load_split
    from qgscale.index.search import load_index

    _, b = run_root
    data, corpus = str(tmp_path / "data"), storage.join(b["data"], "test", "corpus")
    qrels = storage.read_parquet(storage.join(b["data"], "test", "qrels")).to_pylist()
    storage.write_parquet(f"{data}/test/queries/part-00000.parquet",
                          storage.read_parquet(storage.join(b["data"], "test", "queries")))
    first = qrels[0]["qid"]
    for extra, ok in (({"qid": first, "pid": "en:gone", "rel": 1}, True),
                      ({"qid": first, "pid": "en:x", "rel": None}, False)):
        storage.write_parquet(f"{data}/test/qrels/part-00000.parquet",
                              pa.Table.from_pylist([*qrels, extra], schema=QRELS))
        if not ok:
            with pytest.raises(DataError, match=rf"qrels/part-00000.parquet: row {len(qrels)} "
                                                rf"\(qid={first}\): empty field 'rel'"):
                load_split(data, "test", corpus, answers=False)
            continue
        with caplog.at_level(logging.WARNING, logger="qgscale"):
            evaluate_split(b["encoder"], load_index(b["index"]),
                           load_split(data, "test", corpus, answers=False), top_k=5, ks=[1, 5])
        assert re.search(rf"1 positive qrels pair\(s\) of the evaluated queries name a passage "
                         rf"not in the corpus \S+ \(e.g. qid={first}, pid=en:gone\): they "
                         r"count as misses in the pooled view and in every language pair's",
                         caplog.text)


def test_reports_written_to_s3(run_root, s3_bucket):
    from qgscale.eval.evaluate import evaluate_split, load_split, report_names, write_reports
    from qgscale.index.search import load_index

    _, b = run_root
    data = load_split(b["data"], "test")
    out = evaluate_split(b["encoder"], load_index(b["index"]), data, top_k=10, ks=[1, 10])
    out_uri = f"{s3_bucket}/eval/test"
    write_reports(out, out_uri, report_names([1, 10]), "mrr@10")
    got = storage.read_json(f"{out_uri}/metrics.json")
    assert got["pairs"]["de->en"]["mrr@10"] == out["pairs"]["de->en"]["mrr@10"]
    md = storage.read_bytes(f"{out_uri}/metrics.md").decode()
    assert "| de->en |" in md and "macro x->en" in md
    assert "| recall@1 | recall@10 | mrr@10 | ndcg@10 | map | r@2kt | r@5kt | acc@1 | acc@10 |" \
        in md
    assert storage.read_bytes(f"{out_uri}/pairs.png")[:8] == b"\x89PNG\r\n\x1a\n"
    run = storage.read_parquet(f"{out_uri}/run.parquet")
    assert run.num_rows == 2 * N_QUERIES and len(run.column("pids")[0]) == 10


def test_evaluation_in_query_blocks_streams_the_run(run_root, s3_bucket):
    """Queries go a block at a time (the process holds one block's top-k and running sums):
    blocks of 5 give the same metrics, to the last bit, as one block, and the pooled run
    written as it comes (S3) holds the same ranked lists as the one kept in memory."""
    from qgscale.eval.evaluate import evaluate_split, load_split, run_table
    from qgscale.index.search import load_index

    _, b = run_root
    data, loaded = load_split(b["data"], "test"), load_index(b["index"])
    kw = {"top_k": 5, "ks": [1, 5], "batch_size": 1}  # each query encoded alone in both
    whole = evaluate_split(b["encoder"], loaded, data, **kw)
    run_uri = f"{s3_bucket}/eval-blocks/run.parquet"
    blocks = evaluate_split(b["encoder"], loaded, data, block=5, run_uri=run_uri, **kw)
    assert len(data.qids) % 5 and "run" not in blocks  # a short last block; run not held
    for key in ("pairs", "query_langs", "query_langs_macro", "macro", "n_queries"):
        assert blocks[key] == whole[key], key
    assert storage.read_parquet(run_uri).to_pylist() == run_table(whole["run"]).to_pylist()


# ---------------------------------------------------------------------------- ray job submit
WORKER_PORTS = 51  # --min-worker-port .. --max-worker-port, inclusive


def _cluster_ports(n: int) -> tuple[list[int], int]:
    """``n`` free ports for a cluster's components and the start of a block of
    ``WORKER_PORTS`` free ports for its workers, disjoint from them: ``ray start`` refuses a
    component port inside the worker range (CI once drew a dashboard agent port there)."""
    import random

    def bindable(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    rng = random.Random()
    for _ in range(200):  # a block well below the kernel's ephemeral ports (32768 up)
        start = rng.randrange(20000, 32000 - WORKER_PORTS)
        if all(bindable(p) for p in range(start, start + WORKER_PORTS)):
            break
    else:
        raise RuntimeError("no free block of worker ports in 20000-32000")
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held open until all are drawn, so no port is drawn twice
        port = s.getsockname()[1]
        if not start <= port < start + WORKER_PORTS:
            ports.append(port)
    for s in socks:
        s.close()
    return ports, start


def test_cluster_ports_keep_components_out_of_the_worker_range():
    for _ in range(20):
        ports, start = _cluster_ports(9)
        assert len(set(ports)) == 9
        assert not any(start <= p < start + WORKER_PORTS for p in ports)


def _descendants(pid: int) -> set[int]:
    """Processes whose ancestry leads to ``pid`` (from /proc; Linux)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _marked(marker: str) -> set[int]:
    """Processes whose command line names our cluster's unique temp dir."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.add(int(entry))
            except OSError:
                continue
    return out


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --block`` on free ports, started from the venv (its ``python`` first
    on PATH, as ``source .venv/bin/activate`` would). Teardown ends exactly this cluster's
    processes (its process tree and those naming its temp dir), not other Ray instances:
    ``ray stop`` would kill every Ray on the machine, including this session's ``ray_local``."""
    venv_bin = os.path.dirname(sys.executable)
    ray_bin = os.path.join(venv_bin, "ray")
    temp_dir = f"/tmp/rayq-{os.getpid()}-{tmp_path.name[-12:]}"
    (gcs, dash, client, node_mgr, obj_mgr, agent_grpc, agent_http, metrics,
     rt_env), min_worker = _cluster_ports(9)
    token = tmp_path / "auth_token"  # Ray's token auth, with this cluster's own token
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
           "--dashboard-agent-grpc-port", str(agent_grpc),
           "--dashboard-agent-listen-port", str(agent_http),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
           "--min-worker-port", str(min_worker),
           "--max-worker-port", str(min_worker + WORKER_PORTS - 1),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(tmp_path / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_dashboard(address, proc, tmp_path / "ray-start.log")
        yield {"address": address, "env": env, "ray": ray_bin}
    finally:
        tree = _descendants(proc.pid) | _marked(temp_dir)
        for pid in [proc.pid, *tree]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:  # a throwaway cluster: a short grace, then SIGKILL (its temp dir goes too)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 3
        for pid in tree:
            while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.2)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_dashboard(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120):
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # up, and asking for Ray's auth token (the CLI has it)
            return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"Ray dashboard not up after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_ray_job_submit_eval(run_root, s3_bucket, ray_head, tmp_path):
    """The job reads the run from local disk and writes its reports to the S3 endpoint. As on
    a real cluster, the credentials come from the nodes' environment (``ray start`` ran with
    them) and only non-secret settings go in the job's runtime env (the dashboard shows it)."""
    root, b = run_root
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "run": {"name": "eval-job", "root": root},
        "data": {"format": "xquad", "query_langs": LANGS, "corpus_langs": LANGS},
        "index": {"search": {"cpus_per_actor": 1}},
        "eval": {"k": [1, 5, 10], "top_k": 10},
    }))
    # S3 settings and credentials come from the environment `ray start` ran in (as the pods'
    # environment on a cluster), not from the job's runtime env (visible in the dashboard)
    assert "AWS_SECRET_ACCESS_KEY" in ray_head["env"]
    runtime_env = {"excludes": [".git", ".venv", "runs", "bench-out", "**/__pycache__",
                                ".pytest_cache", ".ruff_cache"],
                   "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                **{k: os.environ[k] for k in (
                                    "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}}}
    cmd = [ray_head["ray"], "job", "submit", "--address", ray_head["address"],
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "qgscale.eval", "--config", str(cfg_path),
           "--out", f"{s3_bucket}/eval", "eval.answer_recall=true"]
    res = subprocess.run(cmd, env=ray_head["env"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    # the job sets up qgscale's console like the CLI: its INFO lines reach the job's log
    assert "qgscale INFO joined the Ray cluster at" in res.stdout + res.stderr

    report = f"{s3_bucket}/eval/test"
    assert not os.path.exists(storage.join(root, "eval"))
    got = storage.read_json(storage.join(report, "metrics.json"))
    # the job ran the venv's Python (the head was started from the venv)
    assert got["job"]["driver_python"].startswith(os.path.dirname(sys.executable))
    assert got["python"].startswith(os.path.dirname(sys.executable))
    assert got["job"]["ray_address"]
    # same numbers as evaluating in this process
    from qgscale.eval.evaluate import evaluate_split, load_split
    from qgscale.index.search import load_index

    local = evaluate_split(b["encoder"], load_index(b["index"]), load_split(b["data"], "test"),
                           top_k=10, ks=[1, 5, 10])
    for pair, row in local["pairs"].items():
        for m in ("recall@1", "recall@10", "mrr@10", "ndcg@10", "r@2kt"):
            assert got["pairs"][pair][m] == pytest.approx(row[m], abs=1e-6), (pair, m)
    assert set(got["macro"]) == {"x->en", "cross_lingual", "monolingual"}
    assert storage.read_bytes(storage.join(report, "pairs.png"))[:4] == b"\x89PNG"
    assert "| de->en |" in storage.read_bytes(storage.join(report, "metrics.md")).decode()
    assert storage.read_manifest(f"{s3_bucket}/eval")["splits"]["test"]["macro"]


def _readme_job_recipe() -> list[str]:
    """The README's `ray job submit` block as logical lines (continuations joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split("tests/test_eval_job.py runs this block", 1)[1]
    block = block.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in lines if line.strip()]


@pytest.mark.slow
def test_readme_job_submit_recipe(run_root, tmp_path):
    """The README's sequence, run as written but for: free ports and a temp dir for this
    cluster (other Rays run on this machine), the test's config and run root, a retry while
    the dashboard agent starts, and this cluster's own teardown instead of `ray stop`."""
    root, _ = run_root
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump({"run": {"name": "readme-job", "root": "runs/relative"},
                                        "index": {"search": {"cpus_per_actor": 1}},
                                        "eval": {"k": [1, 5, 10], "top_k": 10}}))
    lines = _readme_job_recipe()
    assert lines[0] == "source .venv/bin/activate" and lines[-1].startswith("ray stop")
    (gcs, dash, client, node_mgr, obj_mgr, agent_grpc, agent_http, metrics,
     rt_env), min_worker = _cluster_ports(9)
    temp_dir = f"/tmp/rayr-{os.getpid()}-{tmp_path.name[-12:]}"
    script = ["set -e"]
    for line in lines:
        line = line.replace("8265", str(dash)).replace("configs/demo.yaml", str(cfg_path))
        line = line.replace("$PWD/runs/demo", root)
        if line.startswith("ray start"):
            line = (f"{line} --port {gcs} --num-cpus 2 --num-gpus 0 "
                    f"--node-ip-address 127.0.0.1 --ray-client-server-port {client} "
                    f"--node-manager-port {node_mgr} --object-manager-port {obj_mgr} "
                    f"--dashboard-agent-grpc-port {agent_grpc} "
                    f"--dashboard-agent-listen-port {agent_http} "
                    f"--metrics-export-port {metrics} --runtime-env-agent-port {rt_env} "
                    f"--min-worker-port {min_worker} "
                    f"--max-worker-port {min_worker + WORKER_PORTS - 1} "
                    f"--temp-dir {temp_dir} --disable-usage-stats")
        elif line.startswith("ray job submit"):
            line = (f"for i in 1 2 3 4 5 6 7 8 9 10; do out=$({line} 2>&1) "
                    "&& break; echo \"$out\" | grep -q 'No available agent' || "
                    "{ echo \"$out\"; exit 1; }; sleep 5; done; echo \"$out\"")
        elif line.startswith("ray stop"):
            continue
        script.append(line)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0")
    (tmp_path / "home").mkdir()
    try:
        res = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=500)
    finally:
        for pid in _marked(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()
    metrics = storage.read_json(storage.join(root, "eval-job", "test", "metrics.json"))
    assert metrics["n_queries"] == 2 * N_QUERIES


def test_eval_job_relative_root_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"root": "runs/x"}}))
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_JOB_CONFIG_JSON_ENV_VAR="{}")
    res = subprocess.run([sys.executable, "-m", "qgscale.eval", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "run.root: 'runs/x' is relative" in res.stderr and "--set run.root=" in res.stderr
    # the report folder too, from the config or --out: the reports would be lost with the copy
    for args in (["--set", "eval.out=reports/x"], ["--out", "reports/x"]):
        res = subprocess.run([sys.executable, "-m", "qgscale.eval", "--config", str(cfg),
                              "--set", f"run.root={tmp_path}/run", *args],
                             capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "eval.out: 'reports/x' is relative" in res.stderr


def test_eval_cli_clear_errors(tmp_path):
    """``python -m qgscale.eval``: a missing model or a bad config key -> exit 2, one line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"root": str(tmp_path / "run")}}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "qgscale.eval", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert f"eval: model {tmp_path / 'run'}/train/distill/model does not exist" in res.stderr
    res = subprocess.run([sys.executable, "-m", "qgscale.eval", "--config", str(cfg),
                          "eval.top_kk=3"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "eval.top_kk: Extra inputs are not permitted" in res.stderr


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IDMap2,HNSW16", "IDMap2,Flat"])
def test_restricted_search_index_types_and_shards(factory):
    """Selector search through IVF / HNSW / IDMap wrappers and over two index shards (which
    faiss.IndexShards alone would search unrestricted) equals exact search over the subset."""
    import faiss

    from qgscale.eval.evaluate import restricted_search
    from qgscale.index.search import LoadedIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    pids = np.array([f"p{i}" for i in range(len(x))], dtype=object)
    trained = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    parts = []
    for lo, hi in ((0, 300), (300, 600)):
        part = faiss.clone_index(trained)
        part.add_with_ids(x[lo:hi], np.arange(lo, hi, dtype=np.int64))
        parts.append(part)
    shards = faiss.IndexShards(16, True, False)
    for p in parts:
        shards.add_shard(p)
    loaded = LoadedIndex(shards, pids, "ip", parts)
    allowed = np.arange(1, 600, 3, dtype=np.int64)
    got, scores = restricted_search(loaded, q, 10, allowed, nprobe=8, ef_search=600)
    exact = q @ x[allowed].T
    order = np.argsort(-exact, axis=1)[:, :10]
    assert [list(r) for r in got] == [list(pids[allowed[o]]) for o in order]
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), rtol=1e-4)


def test_sharded_search_eval_equals_the_loaded_index(run_root, ray_local, tmp_path):
    """The eval task's search (one Ray actor per index shard, each restricting to a corpus
    language with the ids it finds in the corpus's pid/lang columns) gives the runs and
    metrics of the index loaded in one process, here over two index shards."""
    import faiss

    from qgscale.eval.evaluate import evaluate_split, load_split
    from qgscale.index.search import ShardedSearcher, load_index

    _, b = run_root
    data = load_split(b["data"], "test")
    local = evaluate_split(b["encoder"], load_index(b["index"]), data, top_k=5, ks=[1, 5])
    idx = str(tmp_path / "faiss2")
    vecs, n = b["vecs"], len(b["vecs"])
    for j, (lo, hi) in enumerate(((0, n // 3), (n // 3, n))):  # interleaved languages
        part = faiss.index_factory(vecs.shape[1], "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        part.add_with_ids(vecs[lo:hi], np.arange(lo, hi, dtype=np.int64))
        storage.write_bytes(f"{idx}/shards/shard-{j:05d}.faiss",
                            faiss.serialize_index(part).tobytes())
    ids = storage.ShardWriter(f"{idx}/ids")
    ids.write("part-00000", pa.table({"id": np.arange(n, dtype=np.int64), "pid": b["pids"]}))
    ids.finalize(["part-00000"])
    storage.write_manifest(idx, "", factory="Flat", metric="ip", dim=vecs.shape[1], ntotal=n,
                           shards=["shards/shard-00000.faiss", "shards/shard-00001.faiss"],
                           ondisk=False)
    searcher = ShardedSearcher(idx, num_cpus=0.5, corpus_uri=data.corpus_uri)
    try:
        got = evaluate_split(b["encoder"], searcher, data, top_k=5, ks=[1, 5], block=7)
    finally:
        searcher.close()
    assert set(got["pairs"]) == {"en->en", "en->de", "de->en", "de->de"}
    for pair, row in local["pairs"].items():
        for m in ("recall@1", "recall@5", "mrr@10", "r@2kt"):
            assert got["pairs"][pair][m] == pytest.approx(row[m], abs=1e-6), (pair, m)
    assert {q: list(r) for q, r in got["run"].items()} == \
        {q: list(r) for q, r in local["run"].items()}
    # a restricted search returns only that language's passages
    lang = {c["pid"]: c["lang"] for c in b["corpus"]}
    searcher = ShardedSearcher(idx, num_cpus=0.5, corpus_uri=data.corpus_uri)
    try:
        qv = b["encoder"].encode_queries(data.texts[:4]).numpy()
        for cl in LANGS:
            pids, _ = searcher.search(qv, 5, lang=cl)
            assert {lang[p] for row in pids for p in row} == {cl}
    finally:
        searcher.close()


def test_per_language_eval_searches_on_cpus(run_root, ray_local, caplog):
    """GPU index shards take no FAISS ID selector: an eval task given search GPUs searches a
    two-language corpus per language on CPU actors (warned), with the same metrics; with
    ``pairs`` off it asks for the GPUs (this Ray has none: an error, not a wait)."""
    from qgscale.eval.evaluate import evaluate_split, evaluate_uris, load_split
    from qgscale.index.search import load_index
    from qgscale.runtime import ResourceError

    _, b = run_root
    local = evaluate_split(b["encoder"], load_index(b["index"]),
                           load_split(b["data"], "test"), top_k=5, ks=[1, 5])
    kw = dict(top_k=5, ks=[1, 5], search_cpus=0.5, search_gpus=1.0, device="cpu")
    with caplog.at_level(logging.WARNING, logger="qgscale"):
        got = evaluate_uris(b["model"], b["index"], b["data"], "test", **kw)
    assert "the search actors run on CPUs" in caplog.text
    assert set(got["pairs"]) == set(local["pairs"]) == {"en->en", "en->de", "de->en",
                                                         "de->de"}
    for pair, row in local["pairs"].items():
        assert got["pairs"][pair]["mrr@10"] == pytest.approx(row["mrr@10"], abs=1e-6)
    with pytest.raises(ResourceError, match=r"0.5 CPUs and 1 GPUs each, .* at most 0 of them"):
        evaluate_uris(b["model"], b["index"], b["data"], "test", pairs=False, **kw)


def test_eval_refines_as_index_search_says(run_root, ray_local, tmp_path):
    """``index.search.refine`` / ``k_factor`` reach eval: the stage's Ray actors and the
    per-language pair searches, also of an index held here (:func:`restricted_search`). 4-bit
    PQ re-ranked over every passage (``k * k_factor >= n``) with the exact vectors ranks as
    the exact Flat index does; unrefined it does not."""
    import faiss

    from qgscale.config import parse
    from qgscale.eval.evaluate import evaluate_split, load_split, run_eval
    from qgscale.index.search import load_index

    root, b = run_root
    data = load_split(b["data"], "test")
    exact = evaluate_split(b["encoder"], load_index(b["index"]), data, top_k=5, ks=[1, 5])
    vecs, n = b["vecs"], len(b["vecs"])
    pq = faiss.index_factory(vecs.shape[1], "IVF1,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    pq.train(vecs)
    pq.add_with_ids(vecs, np.arange(n, dtype=np.int64))
    idx = str(tmp_path / "pq")
    storage.write_bytes(f"{idx}/shards/shard-00000.faiss", faiss.serialize_index(pq).tobytes())
    ids = storage.ShardWriter(f"{idx}/ids")
    ids.write("part-00000", pa.table({"id": np.arange(n, dtype=np.int64), "pid": b["pids"]}))
    ids.finalize(["part-00000"])
    storage.write_manifest(idx, "", factory="IVF1,PQ4x4", metric="ip", dim=vecs.shape[1],
                           ntotal=n, shards=["shards/shard-00000.faiss"], ondisk=False,
                           embeddings=storage.read_manifest(b["index"])["embeddings"])

    def ranked(run: dict) -> dict:
        return {q: list(r) for q, r in run.items()}

    plain = evaluate_split(b["encoder"], load_index(idx), data, top_k=5, ks=[1, 5])
    assert ranked(plain["run"]) != ranked(exact["run"])
    held = evaluate_split(b["encoder"], load_index(idx, refine="flat", k_factor=n), data,
                          top_k=5, ks=[1, 5])
    cfg = parse({"run": {"root": root}, "eval": {"k": [1, 5], "top_k": 5},
                 "index": {"search": {"refine": "flat", "k_factor": n, "cpus_per_actor": 0.5}}})
    stage = run_eval(cfg, b["model"], idx, b["data"], str(tmp_path / "eval"), ["test"])["test"]
    run = storage.read_parquet(str(tmp_path / "eval" / "test" / "run.parquet")).to_pylist()
    assert {r["qid"]: r["pids"] for r in run} == ranked(exact["run"])
    assert ranked(held["run"]) == ranked(exact["run"])
    assert len(exact["pairs"]) == 4
    for pair, row in exact["pairs"].items():
        for m in ("recall@1", "recall@5", "mrr@10"):
            assert held["pairs"][pair][m] == pytest.approx(row[m], abs=1e-6), (pair, m)
            assert stage["pairs"][pair][m] == pytest.approx(row[m], abs=1e-6), (pair, m)


def test_reports_of_a_split_without_pair_views():
    """``eval.pairs: false`` (or one corpus language left out): the tables, the chart metric
    and the chart come from the query languages' pooled rows (the table had no metric
    column, and an answers-only split's chart failed after every metric was computed)."""
    from qgscale.eval.evaluate import bar_chart, chart_metric, markdown_table

    ranked = {"pairs": {}, "macro": {},
              "query_langs": {"de": {"n": 3, "mrr@10": 0.5}, "es": {"n": 2, "mrr@10": 0.25}}}
    table = markdown_table(ranked, ["recall@1", "mrr@10"])
    assert "| pair | n | mrr@10 |" in table and "| de -> pooled | 3 | 0.5000 |" in table
    answers = {"pairs": {}, "macro": {}, "query_langs": {"de": {"n_kt": 3, "r@2kt": 0.5}}}
    assert chart_metric(ranked, None) == "mrr@10" and chart_metric(answers, None) == "r@2kt"
    assert bar_chart(answers, chart_metric(answers, None))[:4] == b"\x89PNG"
